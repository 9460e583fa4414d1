# CBox - see README.md. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
CONFIG ?= config.yaml
OUT ?= out
# Empty in the source checkout; `make dist` stamps it in the bundle's copy (dist-stage), whose
# targets are then only those that work there (see "In a bundle" below).
BUNDLE :=

.PHONY: help run check-host demo test bench install uninstall images image kernel initramfs rootfs dist dist-pack \
	dist-stage verify clean

help:
ifneq ($(BUNDLE),)
	@echo "CBox air-gap bundle, $$($(PYTHON) cbox.py --version); README.md, \"Air-gapped hosts\""
	@echo "make verify      check every file against SHA256SUMS (do this first, after unpacking)"
	@echo "make check-host  then: preflight, boot one VM, exec, callback, destroy (as root)"
	@echo "make run         serve with the bundled images (needs KVM + cloud-hypervisor)"
	@echo "make install     install as a systemd service (PREFIX=/usr/local, DESTDIR); make uninstall"
	@echo "(demo, test, bench, images and dist need CBox's source checkout)"
else
	@echo "make run      build what is missing, then serve (needs KVM + cloud-hypervisor)"
	@echo "make check-host  run first on a new host: preflight, boot one VM, exec, callback, destroy"
	@echo "make demo     serve the same API with the stand-in hypervisor (NOTHING IS ISOLATED)"
	@echo "make test     run the test suite (as root)"
	@echo "make bench    run the benchmarks, write bench/results.md"
	@echo "make images   build kernel, initramfs and the image \"default\" into $(OUT)/"
	@echo "make image NAME=py [DOCKERFILE=rootfs/Dockerfile.py]  build (or rebuild) one named image"
	@echo "make dist     pack an air-gap tarball (CHV=path adds the cloud-hypervisor binary; IMAGES=\"a b\")"
	@echo "make install  install as a systemd service (PREFIX=/usr/local, DESTDIR); make uninstall"
endif

# ---- In a bundle --------------------------------------------------------------
# The bundle has no tests/, bench/ or image builders: these targets stop there before
# anything runs, saying why in one line.
CHECKOUT_ONLY := test bench demo images image kernel initramfs rootfs dist dist-pack dist-stage
ifneq ($(BUNDLE),)
WHY_test = the test suite is in CBox's source checkout, not in this bundle
WHY_bench = the benchmarks are in CBox's source checkout, not in this bundle
WHY_demo = the demo's stand-in hypervisor (tests/fake_chv.py) is in CBox's source checkout, not in this bundle
WHY_images = this bundle carries its images in $(OUT)/ (make verify checks them); building them needs CBox's source checkout
WHY_image = this bundle carries its images in $(OUT)/images/; to add one, copy its directory there from a host that built it (README "Guest images")
WHY_kernel = $(WHY_images)
WHY_initramfs = $(WHY_images)
WHY_rootfs = $(WHY_images)
WHY_dist = a bundle is made in CBox's source checkout; this one is made already
WHY_dist-pack = $(WHY_dist)
WHY_dist-stage = $(WHY_dist)
GOAL := $(firstword $(filter $(CHECKOUT_ONLY),$(MAKECMDGOALS)))
ifneq ($(GOAL),)
$(error make $(GOAL): $(WHY_$(GOAL)))
endif
endif

# Checks every file of an unpacked bundle against its SHA256SUMS, naming each file that
# differs, is missing or is not listed; then says the sum of SHA256SUMS itself (which
# `make dist` printed) and the version and commit.
verify:
	@set -e; if [ ! -f SHA256SUMS ]; then \
	  echo "make verify: no SHA256SUMS here: it checks a bundle unpacked from the tarball of \`make dist\`" >&2; exit 1; fi; \
	listed=$$(sed 's/^[0-9a-f]\{64\}  //' SHA256SUMS | LC_ALL=C sort); \
	report=$$( (sha256sum -c --quiet SHA256SUMS 2>&1 || true) | sed -n \
	  -e 's/: FAILED$$/: differs from the build/p' -e 's/: FAILED open or read$$/: missing or unreadable/p' \
	  -e 's/^sha256sum: SHA256SUMS: no properly formatted.*/SHA256SUMS: not a list of checksums/p' \
	  -e 's/^sha256sum: WARNING: \(.* improperly formatted\)/SHA256SUMS: \1/p'; \
	  find . \( -type f -o -type l \) ! -path ./SHA256SUMS -printf '%P\n' | LC_ALL=C sort \
	  | LC_ALL=C comm -13 <(echo "$$listed") - | sed 's/$$/: not in SHA256SUMS/'); \
	if [ -n "$$report" ]; then echo "$$report" | sed 's/^/[verify] /' >&2; \
	  echo "[verify] FAILED: this is not the tree \`make dist\` packed; carry the tarball again" >&2; exit 1; fi; \
	echo "[verify] OK: all $$(echo "$$listed" | wc -l) files match SHA256SUMS, and no other file is here"; \
	echo "[verify] sha256 of SHA256SUMS: $$(sha256sum SHA256SUMS | cut -d' ' -f1) (compare it with what make dist printed)"; \
	$(PYTHON) cbox.py --version

test:
	$(PYTHON) -m pytest -q tests

bench:
	$(PYTHON) bench/bench.py

# Real VMs: needs /dev/kvm and the cloud-hypervisor binary named by chv_bin.
run:
	@$(PYTHON) cbox.py preflight --config $(CONFIG)
	$(if $(BUNDLE),,@$(MAKE) --no-print-directory images)
	$(PYTHON) cbox.py serve --config $(CONFIG)

# What to run first on a new host: `cbox.py selftest` prints a PASS/FAIL table with
# timings and a hint per failure; exit 0 only when every step passed.
check-host:
	$(PYTHON) cbox.py selftest --config $(CONFIG)

# The same API with the stand-in hypervisor from tests/: commands run on THIS host.
DEMO := $(OUT)/demo
demo:
	@mkdir -p $(DEMO)
	@for f in vmlinux initramfs.img rootfs.ext4; do test -e $(DEMO)/$$f || echo "demo placeholder" > $(DEMO)/$$f; done
	@printf '%s\n' 'hostservices:' '  restserver:' \
	  '    host: "127.0.0.1"' '    port: 7000' \
	  '    state_dir: "state"' '    run_dir: "/tmp/cbox-demo"' \
	  '    bridge_name: "cboxdemo0"' '    bridge_ip: "10.20.9.1/24"' '    bridge_subnet: "10.20.9.0/24"' \
	  '    nat_interface: "none"' '    dns: "10.20.9.1"' \
	  '    chv_bin: "$(CURDIR)/tests/fake_chv.py"' \
	  '    kernel: "vmlinux"' '    initramfs: "initramfs.img"' '    rootfs: "rootfs.ext4"' \
	  '    stateful_size_in_mb: 256' '    destroy_on_exit: true' > $(DEMO)/config.yaml
	@echo "################################################################################"
	@echo "# CBOX DEMO: the stand-in hypervisor runs 'guests' as plain processes on THIS  #"
	@echo "# host (own network and hostname namespaces only). NOTHING IS ISOLATED: every  #"
	@echo "# command you exec runs as root on this machine's file system. Try it, then   #"
	@echo "# stop with Ctrl-C (the demo destroys its VMs on exit).                         #"
	@echo "################################################################################"
	$(PYTHON) cbox.py serve --config $(DEMO)/config.yaml

# ---- install as a service ------------------------------------------------------
# cbox.py (its commit stamped: STAMP_COMMIT) and guest_agent.py in $(LIBDIR), the `cbox`
# command in $(BINDIR), the config in $(CONFDIR) (an existing config.yaml is kept; the
# shipped one is always written beside it as config.yaml.default), the images of $(OUT)/ if built in
# $(STATEDIR)/images, and cbox.service in $(UNITDIR). DESTDIR prefixes them all.
# A `cloud-hypervisor` file beside this Makefile (as `make dist CHV=...` packs it)
# goes to $(LIBDIR) and the installed config's chv_bin names it.
PREFIX ?= /usr/local
DESTDIR ?=
BINDIR ?= $(PREFIX)/bin
LIBDIR ?= $(PREFIX)/lib/cbox
CONFDIR ?= /etc/cbox
STATEDIR ?= /var/lib/cbox
UNITDIR ?= /etc/systemd/system
INSTALL_PYTHON ?= /usr/bin/python3
# run as `$(SYSTEMCTL) daemon-reload` after (un)installing into the real root
SYSTEMCTL ?= systemctl
IMAGE_FILES := vmlinuz initramfs.cpio.gz rootfs.ext4 kernel.release
SUBST = sed -e 's|@BINDIR@|$(BINDIR)|g' -e 's|@LIBDIR@|$(LIBDIR)|g' \
	-e 's|@CONFIG@|$(CONFDIR)/config.yaml|g' -e 's|@PYTHON@|$(INSTALL_PYTHON)|g'

install:
	@set -e; d="$(DESTDIR)"; \
	install -d -m 0755 "$$d$(LIBDIR)" "$$d$(BINDIR)" "$$d$(UNITDIR)"; \
	install -d -m 0750 "$$d$(CONFDIR)" "$$d$(STATEDIR)"; \
	$(STAMP_COMMIT) > "$$d$(LIBDIR)/cbox.py.tmp"; chmod 0755 "$$d$(LIBDIR)/cbox.py.tmp"; \
	mv -f "$$d$(LIBDIR)/cbox.py.tmp" "$$d$(LIBDIR)/cbox.py"; \
	install -m 0644 guest_agent.py "$$d$(LIBDIR)/guest_agent.py"; \
	$(SUBST) service/cbox.in > "$$d$(BINDIR)/cbox.tmp"; chmod 0755 "$$d$(BINDIR)/cbox.tmp"; \
	mv -f "$$d$(BINDIR)/cbox.tmp" "$$d$(BINDIR)/cbox"; \
	$(SUBST) service/cbox.service.in > "$$d$(UNITDIR)/cbox.service"; chmod 0644 "$$d$(UNITDIR)/cbox.service"; \
	chv=; if [ -f cloud-hypervisor ]; then chv="$(LIBDIR)/cloud-hypervisor"; \
	  install -m 0755 cloud-hypervisor "$$d$$chv"; fi; \
	sed -e 's,"/var/lib/cbox","$(STATEDIR)",' \
	    -e 's,^\(    \(kernel\|initramfs\|rootfs\): *"\)out/,\1$(STATEDIR)/images/,' \
	    -e 's,^\(    images_dir: *"\)out/images",\1$(STATEDIR)/images",' \
	    $${chv:+-e "s|^\(    chv_bin:\).*|\1 \"$$chv\"|"} \
	    config.yaml > "$$d$(CONFDIR)/config.yaml.default"; \
	chmod 0640 "$$d$(CONFDIR)/config.yaml.default"; \
	if [ -e "$$d$(CONFDIR)/config.yaml" ]; then \
	  echo "[install] kept $$d$(CONFDIR)/config.yaml (the shipped one is config.yaml.default)"; \
	else cp -p "$$d$(CONFDIR)/config.yaml.default" "$$d$(CONFDIR)/config.yaml"; fi; \
	found=; for n in $$($(BUILT_IMAGES)); do found=1; install -d -m 0755 "$$d$(STATEDIR)/images/$$n"; \
	  $(call COPY_IMAGE,$(IMAGES_DIR)/$$n,$$d$(STATEDIR)/images/$$n); done; \
	for f in $(IMAGE_FILES); do \
	  if [ -e "$(OUT)/$$f" ]; then found=1; install -d -m 0755 "$$d$(STATEDIR)/images"; \
	    if [ $$f = rootfs.ext4 ] && $(DEFAULT_LINKED); then ln -sfn default/rootfs.ext4 "$$d$(STATEDIR)/images/$$f.tmp"; \
	    else cp --sparse=always "$(OUT)/$$f" "$$d$(STATEDIR)/images/$$f.tmp"; fi; \
	    mv -fT "$$d$(STATEDIR)/images/$$f.tmp" "$$d$(STATEDIR)/images/$$f"; fi; \
	done; \
	[ -n "$$found" ] || echo "[install] no images in $(OUT)/: run 'make images' and 'make install' again"; \
	if [ -z "$$d" ] && [ -d /run/systemd/system ]; then $(SYSTEMCTL) daemon-reload; fi; \
	echo "[install] done: edit $(CONFDIR)/config.yaml, then: systemctl enable --now cbox"

# Removes what install put there; a config.yaml that differs from the shipped one,
# and VM state in $(STATEDIR), stay.
uninstall:
	@set -e; d="$(DESTDIR)"; \
	rm -f "$$d$(LIBDIR)/cbox.py" "$$d$(LIBDIR)/guest_agent.py" "$$d$(LIBDIR)/cloud-hypervisor" \
	      "$$d$(BINDIR)/cbox" "$$d$(UNITDIR)/cbox.service"; \
	rm -rf "$$d$(LIBDIR)/__pycache__"; \
	for f in $(IMAGE_FILES); do rm -f "$$d$(STATEDIR)/images/$$f"; done; \
	for j in "$$d$(STATEDIR)"/images/*/image.json; do [ -f "$$j" ] || continue; n=$$(dirname "$$j"); \
	  rm -f "$$n/rootfs.ext4" "$$n/vmlinuz" "$$n/initramfs.cpio.gz" "$$n/.build.lock" "$$j"; rmdir "$$n" 2>/dev/null || true; done; \
	if [ -e "$$d$(CONFDIR)/config.yaml" ] && [ -e "$$d$(CONFDIR)/config.yaml.default" ] \
	   && cmp -s "$$d$(CONFDIR)/config.yaml" "$$d$(CONFDIR)/config.yaml.default"; then rm -f "$$d$(CONFDIR)/config.yaml"; fi; \
	rm -f "$$d$(CONFDIR)/config.yaml.default"; \
	[ ! -e "$$d$(CONFDIR)/config.yaml" ] || echo "[uninstall] kept $$d$(CONFDIR)/config.yaml (changed since install)"; \
	for dir in "$$d$(LIBDIR)" "$$d$(CONFDIR)" "$$d$(STATEDIR)/images" "$$d$(STATEDIR)"; do \
	  rmdir "$$dir" 2>/dev/null || true; done; \
	[ ! -e "$$d$(STATEDIR)" ] || echo "[uninstall] kept $$d$(STATEDIR) (VM state; remove it by hand)"; \
	if [ -z "$$d" ] && [ -d /run/systemd/system ]; then $(SYSTEMCTL) daemon-reload; fi

# ---- images (kernel, initramfs, rootfs, dist) -------------------------------
# (section owned by the image builders; see issue 3)
# Usage:
#   make images                       kernel + initramfs + the image "default" into $(OUT)/
#   make images KERNEL=/path/vmlinux [KERNEL_MODULES=/path/lib/modules/<rel>]
#   make image NAME=py DOCKERFILE=rootfs/Dockerfile.py   the image "py" in $(IMAGES_DIR)/py/
#                                     (podman or docker; `FROM cbox-base` = the debootstrap base)
#   make image NAME=min               an image of the debootstrap base alone
#        [IMAGE_KERNEL=path IMAGE_INITRAMFS=path]  the image's own kernel / initramfs
#        [FORCE=1]                    rebuild even when up to date
#   make rootfs [DOCKERFILE=path]     the image "default" ($(OUT)/rootfs.ext4 links to its rootfs)
#   make rootfs SUITE=bookworm MIRROR=http://...   (defaults: stable, host's apt mirror)
#   make dist [CHV=/path/cloud-hypervisor] [IMAGES="default py"]   air-gap tarball in $(OUT)/
#                                     (README "Air-gapped hosts"; IMAGES: default all built)
#   make dist-pack [CHV=...]                       the same from the images already in $(OUT)/
# Each step skips what is up to date; `rm -rf build` forces a fresh debootstrap
# and kernel download. A rebuilt image replaces the old one file by file with
# renames: a VM running on the old rootfs keeps it, new starts get the new one.
BUILD ?= build
KERNEL ?=
KERNEL_MODULES ?=
DOCKERFILE ?=
IMAGES_DIR ?= $(OUT)/images
NAME ?=
IMAGE_KERNEL ?=
IMAGE_INITRAMFS ?=
FORCE ?=
IMAGES ?=
SUITE ?= stable
MIRROR ?=
CHV ?=
DIST_NAME ?= cbox

images: kernel initramfs rootfs
	@ls -lL $(OUT)/vmlinuz $(OUT)/initramfs.cpio.gz $(OUT)/rootfs.ext4

kernel:
	@KERNEL="$(KERNEL)" KERNEL_MODULES="$(KERNEL_MODULES)" sh initramfs/kernel.sh $(OUT) $(BUILD)

initramfs: kernel
	@$(PYTHON) initramfs/build.py --out $(OUT)/initramfs.cpio.gz \
	    $$(test -e $(BUILD)/kernel/modules && echo --modules $(BUILD)/kernel/modules/)

# The names of the built images in $(IMAGES_DIR) (a directory with an image.json), one a line.
BUILT_IMAGES = for j in "$(IMAGES_DIR)"/*/image.json; do if [ -f "$$j" ]; then basename "$$(dirname "$$j")"; fi; done
# True when $(OUT)/rootfs.ext4 is the link to the image "default" (not a plain file of before).
DEFAULT_LINKED = { [ -L $(OUT)/rootfs.ext4 ] && [ "$$(realpath $(OUT)/rootfs.ext4)" = "$$(realpath -m "$(IMAGES_DIR)/default/rootfs.ext4")" ]; }
# The published files of image directory $(1) into directory $(2), each copied beside as .tmp
# and renamed over (a VM on the old file keeps it), image.json last.
COPY_IMAGE = for f in rootfs.ext4 vmlinuz initramfs.cpio.gz image.json; do [ ! -f "$(1)/$$f" ] || { \
	cp --sparse=always "$(1)/$$f" "$(2)/$$f.tmp" && mv -f "$(2)/$$f.tmp" "$(2)/$$f"; }; done

# rootfs/build.py for image $(1), with --link $(OUT)/rootfs.ext4 for the image "default"
BUILD_IMAGE = $(PYTHON) rootfs/build.py --name="$(1)" --images-dir "$(IMAGES_DIR)" --build $(BUILD) \
	--suite $(SUITE) $(if $(MIRROR),--mirror $(MIRROR)) $(if $(DOCKERFILE),--dockerfile "$(DOCKERFILE)") \
	$(if $(IMAGE_KERNEL),--kernel "$(IMAGE_KERNEL)") $(if $(IMAGE_INITRAMFS),--initramfs "$(IMAGE_INITRAMFS)") \
	$(if $(FORCE),--force) $(if $(filter default,$(1)),--link $(OUT)/rootfs.ext4)

rootfs:
	@$(call BUILD_IMAGE,default)

image:
	@test -n "$(NAME)" || { echo "make image: say which image: NAME=py DOCKERFILE=rootfs/Dockerfile.py (or NAME=min, the base alone)" >&2; exit 2; }
	@$(call BUILD_IMAGE,$(NAME))

dist: images
	@$(MAKE) --no-print-directory dist-pack

# The tarball of the images already in $(OUT)/ (`make dist` builds them first): the tree of
# dist-stage packed as $(OUT)/NAME.tar.gz, and that tarball's sum in $(OUT)/SHA256SUMS.
dist-pack:
	@set -e; name=$(DIST_NAME)-$$(date +%Y%m%d); rm -rf $(BUILD)/dist; \
	$(MAKE) --no-print-directory dist-stage STAGE=$(BUILD)/dist/$$name; \
	echo "[dist] packing $(OUT)/$$name.tar.gz"; \
	tar --sparse -C $(BUILD)/dist -czf $(OUT)/$$name.tar.gz $$name; \
	inner=$$(sha256sum $(BUILD)/dist/$$name/SHA256SUMS | cut -d' ' -f1); rm -rf $(BUILD)/dist; \
	(cd $(OUT) && sha256sum $$name.tar.gz > SHA256SUMS.tmp && mv -f SHA256SUMS.tmp SHA256SUMS); \
	ls -l $(OUT)/$$name.tar.gz; \
	echo "[dist] carry $(OUT)/$$name.tar.gz and $(OUT)/SHA256SUMS (there: sha256sum -c SHA256SUMS)"; \
	echo "[dist] sha256 of the tarball: $$(cut -d' ' -f1 $(OUT)/SHA256SUMS)"; \
	echo "[dist] sha256 of its SHA256SUMS (make verify prints it): $$inner"

# cbox.py with its COMMIT line stamped (build_commit): the checkout's HEAD, "-dirty" when git
# shows uncommitted changes or cannot tell (safe.directory: `sudo make install` in a user's checkout
# is no reason to doubt it); a copy stamped already (a bundle's) stays as it is.
STAMP_COMMIT = c=$$($(PYTHON) cbox.py --version | cut -d' ' -f4); \
	if [ "$$c" != unknown ] && ! git -c safe.directory="$(CURDIR)" -C "$(CURDIR)" diff --quiet HEAD -- 2>/dev/null; \
	then c="$$c-dirty"; fi; \
	sed "s/^COMMIT = \"\"/COMMIT = \"$$c\"/" cbox.py

# The tarball's tree in STAGE: what `make install` (or `./cbox.py serve` in place) needs, with
# BUNDLE and the commit stamped, and SHA256SUMS of every file (`make verify` checks them).
dist-stage:
	@set -e; stage="$(STAGE)"; test -n "$$stage"; rm -rf "$$stage"; mkdir -p "$$stage/out"; \
	cp guest_agent.py config.yaml README.md "$$stage/"; cp -r service "$$stage/"; \
	$(STAMP_COMMIT) > "$$stage/cbox.py"; chmod 0755 "$$stage/cbox.py"; \
	sed 's/^BUNDLE :=$$/BUNDLE := yes/' Makefile > "$$stage/Makefile"; grep -q '^BUNDLE := yes$$' "$$stage/Makefile"; \
	cp $(OUT)/vmlinuz $(OUT)/initramfs.cpio.gz $(OUT)/kernel.release "$$stage/out/"; \
	$(STAGE_IMAGES); \
	if [ -n "$(CHV)" ]; then cp "$(CHV)" "$$stage/cloud-hypervisor"; chmod 0755 "$$stage/cloud-hypervisor"; \
	  sed -i 's|^\(    chv_bin:\).*|\1 "./cloud-hypervisor"|' "$$stage/config.yaml"; fi; \
	files=$$(cd "$$stage" && find . \( -type f -o -type l \) -printf '%P\n' | LC_ALL=C sort); \
	(cd "$$stage" && sha256sum $$files > SHA256SUMS)

# The named images of $(IMAGES_DIR) in $$stage/out/images/ (IMAGES, default every built one:
# a directory with an image.json), their published files only; $(OUT)/rootfs.ext4 as the
# symlink to the image "default" when it is one (that image then goes along), else a copy.
STAGE_IMAGES = built=$$($(BUILT_IMAGES)); names="$(IMAGES)"; \
	[ -n "$$names" ] || names="$$built"; \
	linked=; if $(DEFAULT_LINKED); then linked=1; names="default $$names"; fi; \
	for n in $$(printf '%s\n' $$names | awk '!seen[$$0]++'); do d="$(IMAGES_DIR)/$$n"; \
	  if [ ! -f "$$d/image.json" ] || [ ! -f "$$d/rootfs.ext4" ]; then \
	    echo "make dist: no image \"$$n\" in $(IMAGES_DIR)/ (built: $$(echo $$built))" >&2; exit 1; fi; \
	  mkdir -p "$$stage/out/images/$$n"; $(call COPY_IMAGE,$$d,$$stage/out/images/$$n); \
	  echo "[dist] image $$n"; done; \
	if [ -n "$$linked" ]; then ln -s images/default/rootfs.ext4 "$$stage/out/rootfs.ext4"; \
	else cp --sparse=always $(OUT)/rootfs.ext4 "$$stage/out/"; fi
