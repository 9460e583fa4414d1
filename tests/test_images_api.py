"""Guest images through cbox.py (issue 20): POST /v1/vms "image" and "diskMb", GET /v1/images,
DELETE /v1/images/{image}, ?image= on /v1/vms, the warm pool per image, a restart, the CLI.

The stand-in hypervisor runs no image: an image here is a directory as rootfs/build.py makes
it (image.json, a rootfs.ext4 with an ext4 superblock's magic), and what cbox.py asked of the
hypervisor (vm.info's config) shows which files a VM got. tests/test_images.py boots real
images under QEMU."""
import fcntl
import json
import sys

from conftest import REPO
from imageutil import standin_image
from nsutil import entered
from procutil import wait_for

sys.path.insert(0, str(REPO))
import cbox  # noqa: E402

CLI = [sys.executable, str(REPO / "cbox.py"), "--server", "http://127.0.0.1:7000"]


def images_server(cbox_factory, tmp_path, **overrides):
    images = tmp_path / "named"
    standin_image(images, "py", protocol=cbox.AGENT_PROTOCOL, dockerfile="rootfs/Dockerfile.py")
    standin_image(images, "own", protocol=cbox.AGENT_PROTOCOL, kernel=True)
    standin_image(images, "old", protocol=0, dockerfile="rootfs/Dockerfile.py")
    standin_image(images, "flat", protocol=cbox.AGENT_PROTOCOL, ext4=False)
    (images / "half").mkdir()                                  # a build that has not published yet
    (images / "half" / "rootfs.ext4.tmp").write_bytes(b"")
    return cbox_factory(images_dir=str(images), **overrides), images


def booted_config(server, vm):
    """The VmConfig cbox.py gave the hypervisor for this VM (vm.info)."""
    status, info = server.vmm_api(vm["cid"], "GET", "vm.info")
    assert status == 200, info
    return info["config"]


def test_a_start_chooses_its_image_and_refuses_unknown_and_unusable_ones(cbox_factory, tmp_path):
    server, images = images_server(cbox_factory, tmp_path)
    api = server.start().api
    vm = api.start_vm("a", image="py")
    assert vm["image"] == "py" and vm["diskMb"] == 64
    config = booted_config(server, vm)
    assert config["disks"][0]["path"] == str(images / "py" / "rootfs.ext4")
    assert config["payload"]["kernel"] == server.settings["kernel"]              # the config's: py has none
    b = api.start_vm("b")
    assert b["image"] == "default" and booted_config(server, b)["disks"][0]["path"] == server.settings["rootfs"]
    own = api.start_vm("c", image="own")
    assert booted_config(server, own)["payload"]["kernel"] == str(images / "own" / "vmlinuz")
    assert booted_config(server, own)["payload"]["initramfs"] == server.settings["initramfs"]

    status, body = api.post("/v1/vms", {"vmName": "x", "image": "nope"})
    assert status == 400 and body["images"] == ["default", "flat", "old", "own", "py"], body
    assert body["error"] == "unknown image 'nope': the images are default, flat, old, own, py"
    status, body = api.post("/v1/vms", {"vmName": "x", "image": "old"})
    assert status == 409 and "guest agent (version 0.1.0, protocol 0) is older than this cbox.py needs" in body["error"]
    assert body["error"].endswith("rebuild it: make image NAME=old DOCKERFILE=rootfs/Dockerfile.py"), body
    status, body = api.post("/v1/vms", {"vmName": "x", "image": "flat"})
    assert status == 409 and "is not an ext4 file system" in body["error"] and "make image NAME=flat" in body["error"]
    status, body = api.post("/v1/vms", {"vmName": "x", "image": "half"})
    assert status == 400, body
    status, body = api.post("/v1/vms", {"vmName": "x", "image": "../py"})
    assert status == 400 and "invalid image name" in body["error"]
    assert api.get("/v1/vms/x")[0] == 404 and not (server.state_dir / "vms" / "x.json").exists()

    assert [v["vmName"] for v in api.get("/v1/vms?image=py")[1]["vms"]] == ["a"]
    assert sorted(v["vmName"] for v in api.get("/v1/vms?image=default&image=own")[1]["vms"]) == ["b", "c"]
    assert api.get("/v1/vms?image=..")[0] == 400
    assert json.loads((server.state_dir / "vms" / "a.json").read_text())["image"] == "py"

    listed = {i["name"]: i for i in api.get("/v1/images")[1]["images"]}
    assert sorted(listed) == ["default", "flat", "old", "own", "py"]
    py = listed["py"]
    assert py == {"name": "py", "sizeBytes": 64 << 20, "builtAt": "2026-12-07T00:00:00Z",
                  "source": {"type": "dockerfile", "dockerfile": "rootfs/Dockerfile.py", "sha256": "0" * 64},
                  "agentVersion": "0.1.0", "agentProtocol": cbox.AGENT_PROTOCOL,
                  "rootfs": str(images / "py" / "rootfs.ext4"), "ownKernel": False, "usable": True,
                  "problem": None, "vms": ["a"], "pooled": 0}
    assert listed["old"]["usable"] is False and "protocol 0" in listed["old"]["problem"]
    assert listed["own"]["ownKernel"] is True and listed["default"]["vms"] == ["b"]
    assert listed["default"]["builtAt"] is None and listed["default"]["usable"] is True    # a rootfs of before images
    assert api.get("/v1/images/py")[1] == py
    assert api.get("/v1/images/nope")[0] == 404
    api.delete("/v1/vms", timeout=60)
    server.assert_clean()


def test_delete_an_image_only_when_nothing_uses_it(cbox_factory, tmp_path):
    server, images = images_server(cbox_factory, tmp_path)
    api = server.start().api
    api.start_vm("a", image="py")
    status, body = api.delete("/v1/images/py")
    assert status == 409 and body["error"] == "image 'py' is used by VM(s) a: destroy them first"
    status, body = api.delete("/v1/images/default")
    assert status == 409 and "never removed" in body["error"]
    assert api.delete("/v1/images/nope")[0] == 404 and api.delete("/v1/images/a%2Fb")[0] == 400
    # a build of it under way (rootfs/build.py holds the lock): refused, nothing changed
    lock = open(images / "own" / ".build.lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    status, body = api.delete("/v1/images/own")
    lock.close()
    assert status == 409 and "is being built" in body["error"]
    assert (images / "own" / "image.json").exists() and (images / "own" / "vmlinuz").exists()
    assert api.delete("/v1/images/own") == (200, {"success": True})
    assert not (images / "own").exists() and api.get("/v1/images/own")[0] == 404
    assert api.post("/v1/vms", {"vmName": "b", "image": "own"})[0] == 400

    assert api.delete("/v1/vms/a")[0] == 200
    assert api.delete("/v1/images/py") == (200, {"success": True})
    assert [i["name"] for i in api.get("/v1/images")[1]["images"]] == ["default", "flat", "old"]
    server.assert_clean()


def test_disk_mb_sizes_a_vms_stateful_disk_within_the_maximum(cbox_factory, tmp_path):
    server, _ = images_server(cbox_factory, tmp_path, max_disk_mb=200)
    api = server.start().api
    big = api.start_vm("big", diskMb=200)
    small = api.start_vm("small")
    assert (big["diskMb"], small["diskMb"]) == (200, 64)
    vms = server.state_dir / "vms"
    sizes = {p.parent.name: p.stat().st_size for p in vms.glob("*/stateful.ext4")}
    assert sorted(sizes.values()) == [64 << 20, 200 << 20], sizes
    for disk_mb in (201, 63):
        status, body = api.post("/v1/vms", {"vmName": "x", "diskMb": disk_mb})
        assert status == 400 and "diskMb must be 64..200" in body["error"], body
    # the VM's disk works: the guest writes to it
    assert api.exec("big", "echo ok")["stdout"] == "ok\n"
    with entered(f"/run/netns/{server.ns.name}"):                   # the Python client says it the same way
        client = cbox.Client("http://127.0.0.1:7000", timeout=60)
        vm = client.start("viaclient", image="py", disk_mb=100)
        assert (vm.info["image"], vm.info["diskMb"]) == ("py", 100)
        assert [v.name for v in client.list(image="py")] == ["viaclient"]
        client.close()
    api.delete("/v1/vms", timeout=60)
    server.assert_clean()


def test_images_of_vms_survive_a_restart(cbox_factory, tmp_path):
    server, images = images_server(cbox_factory, tmp_path, max_disk_mb=128)
    api = server.start().api
    api.start_vm("a", image="py", diskMb=128)
    server.stop()
    server = cbox_factory(images_dir=str(images), max_disk_mb=128).start()
    api = server.api
    vm = api.get("/v1/vms/a")[1]
    assert (vm["status"], vm["image"], vm["diskMb"]) == ("RUNNING", "py", 128), vm
    assert api.get("/v1/images/py")[1]["vms"] == ["a"]
    assert api.delete("/v1/images/py")[0] == 409
    api.delete("/v1/vms", timeout=60)
    server.assert_clean()


def pool(api):
    return api.get("/v1/health")[1]["pool"]


def test_the_warm_pool_keeps_vms_per_image(cbox_factory, tmp_path):
    server, images = images_server(cbox_factory, tmp_path, pool_size=1, pool_images="py=1")
    api = server.start().api
    wait_for(lambda: pool(api)["ready"] == 2, timeout=60, what="2 pool VMs")
    assert pool(api)["images"] == {"default": {"size": 1, "ready": 1, "booting": 0},
                                   "py": {"size": 1, "ready": 1, "booting": 0}}
    assert api.get("/v1/images/py")[1]["pooled"] == 1
    status, body = api.delete("/v1/images/py")
    assert status == 409 and "warm pool" in body["error"]
    vm = api.start_vm("p", image="py")
    assert "claim step vm=p" in server.log() and booted_config(server, vm)["disks"][0]["path"].endswith("py/rootfs.ext4")
    d = api.start_vm("d")
    assert "claim step vm=d" in server.log() and d["image"] == "default"
    own = api.start_vm("o", image="own")                             # none of it pooled: booted cold
    assert "claim step vm=o" not in server.log() and own["image"] == "own"
    wait_for(lambda: pool(api)["ready"] == 2, timeout=60, what="the pool refilled per image")
    assert pool(api)["images"]["py"]["ready"] == 1
    # a restart re-adopts the pool VMs of each image (not rebooted), the other VMs with their images
    pids = sorted(server.vmm_pids())
    server.stop()                                                     # left running (no destroy_on_exit)
    server = cbox_factory(images_dir=str(images), pool_size=1, pool_images="py=1").start()
    api = server.api
    assert pool(api)["images"] == {"default": {"size": 1, "ready": 1, "booting": 0},
                                   "py": {"size": 1, "ready": 1, "booting": 0}}
    assert sorted(server.vmm_pids()) == pids and server.log().count("pool VM re-adopted") == 2
    assert {v["vmName"]: v["image"] for v in api.get("/v1/vms")[1]["vms"]} == {"p": "py", "d": "default", "o": "own"}
    assert api.start_vm("p2", image="py") and "claim step vm=p2" in server.log()
    api.delete("/v1/vms", timeout=60)


def rebuild(images, name):
    """What `make image` does to an image: a new rootfs.ext4 and image.json renamed over the old."""
    new = images / name / "rootfs.ext4.tmp"
    new.write_bytes((images / name / "rootfs.ext4").read_bytes())
    new.rename(images / name / "rootfs.ext4")
    meta = json.loads((images / name / "image.json").read_text())
    (images / name / "image.json").write_text(json.dumps(dict(meta, builtAt="2026-12-07T01:00:00Z")))


def test_a_pool_vm_of_a_rebuilt_image_is_not_handed_out(cbox_factory, tmp_path):
    """New starts get the new image: a pool VM booted from the image before `make image` rebuilt
    it is destroyed at the next start of that image (booted cold meanwhile) and the pool refills."""
    server, images = images_server(cbox_factory, tmp_path, pool_images="py=1")
    api = server.start().api
    wait_for(lambda: pool(api)["ready"] == 1, timeout=60, what="a pool VM of py")
    rebuild(images, "py")
    api.start_vm("p", image="py")
    assert "claim step vm=p" not in server.log()
    wait_for(lambda: "pool VM removed" in server.log() and "its image was rebuilt" in server.log(), timeout=30,
             what="the stale pool VM removed")
    wait_for(lambda: pool(api)["ready"] == 1, timeout=60, what="the pool refilled")
    api.start_vm("q", image="py")
    assert "claim step vm=q" in server.log()                       # the new pool VM: of the new build
    api.delete("/v1/vms", timeout=60)


def test_pool_images_config_is_checked(tmp_path):
    def load(line):
        path = tmp_path / "config.yaml"
        path.write_text(f"hostservices:\n  restserver:\n    max_vms: 4\n    {line}\n")
        return cbox.load_config(path)
    assert cbox.pool_sizes(load('pool_images: "py=2, min=1"')) == {"py": 2, "min": 1}
    for bad, said in (('pool_images: "py"', "use NAME=COUNT"), ('pool_images: "../x=1"', "use NAME=COUNT"),
                      ('pool_images: "default=1"', "pool_size"), ('pool_images: "py=5"', "at most max_vms"),
                      ("max_disk_mb: 10", "max_disk_mb must be 0 (stateful_size_in_mb) or 2048..")):
        try:
            load(bad)
        except cbox.ConfigError as e:
            assert said in str(e), (bad, str(e))
        else:
            raise AssertionError(f"{bad} was accepted")


def test_cli_images(cbox_factory, tmp_path):
    server, images = images_server(cbox_factory, tmp_path)
    server.start()
    run = server.ns.run
    out = run(*CLI, "vm", "start", "a", "--image", "py", "--disk-mb", "64").stdout
    assert out.startswith("a RUNNING ") and " image=py" in out, out
    lines = run(*CLI, "image", "ls").stdout.splitlines()
    assert lines[0].split() == ["NAME", "SIZE_MB", "BUILT", "AGENT", "VMS", "SOURCE"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert sorted(rows) == ["default", "flat", "old", "own", "py"]
    assert rows["py"].split()[1:5] == ["64", "2026-12-07T00:00:00Z", f"0.1.0/{cbox.AGENT_PROTOCOL}", "a"], rows["py"]
    assert "UNUSABLE" in rows["old"] and "rootfs/Dockerfile.py" in rows["py"]
    r = run(*CLI, "image", "rm", "py", check=False)
    assert r.returncode != 0 and "used by VM(s) a" in r.stderr
    assert run(*CLI, "vm", "rm", "a").returncode == 0
    assert run(*CLI, "image", "rm", "py").stdout.strip() == "py removed"
    assert not (images / "py").exists()
    server.assert_clean()


def test_an_image_a_start_is_using_is_not_removed_before_its_vm_is_listed(tmp_path):
    """VmStarter and ImageKeeper in-process: a start that waits for room (a warm pool VM giving
    way) holds its image though its VM is not among the VMs yet: DELETE /v1/images answers
    409 meanwhile, and removes the image once the start is over."""
    import asyncio
    (tmp_path / "config.yaml").write_text("hostservices:\n  restserver:\n    max_vms: 4\n")
    cfg = cbox.load_config(tmp_path / "config.yaml", {"state_dir": str(tmp_path), "run_dir": str(tmp_path)})
    removed = []

    class Image:
        name = "py"

        def api(self, vms, pooled):
            return {"name": self.name, "vms": vms, "pooled": pooled}

    class Images:
        def for_start(self, name):
            return Image()

        def get(self, name):
            return Image()

        def remove(self, name):
            removed.append(name)

    class Pool:
        sizes = {}

        def __init__(self):
            self.gave_way = asyncio.Event()
            self.go_on = asyncio.Event()

        def take(self, spec, image):
            return None

        def vms(self):
            return []

        async def give_up_one(self):      # a ready pool VM being destroyed for the start
            self.gave_way.set()
            await self.go_on.wait()
            return True

    class Capacity:
        checks = 0

        def check(self, vcpus, memory_mb, disk_mb, pool):
            self.checks += 1
            if self.checks == 1:
                raise cbox.ApiError(503, "no room")

    class Booter:
        def new_vm(self, spec, image):
            return cbox.VM(cfg, vmName=spec["vmName"], image=image.name, phase="starting")

        async def boot(self, vm, clock, failures):
            raise cbox.ApiError(500, "stop here: the test needs no boot")

    async def scenario():
        registry, pool = cbox.VmRegistry(cfg), Pool()
        starter = cbox.VmStarter(registry, Capacity(), Images(), pool, Booter(), None, asyncio.Event())
        keeper = cbox.ImageKeeper(Images(), registry, pool)
        start = asyncio.ensure_future(starter.start({"vmName": "s", "image": "py", "vcpus": 1, "memoryMb": 64, "diskMb": 0}))
        await asyncio.wait_for(pool.gave_way.wait(), 5)
        try:
            await keeper.remove("py")
        except cbox.ApiError as e:
            assert e.status == 409 and "1 VM start(s) in progress" in str(e), str(e)
        else:
            raise AssertionError("the image was removed under a start")
        pool.go_on.set()
        try:
            await asyncio.wait_for(start, 5)
        except cbox.ApiError as e:
            assert "stop here" in str(e)
        assert registry.starting_images == {} and registry.vms["s"].image == "py"
        del registry.vms["s"]
        await keeper.remove("py")
        assert removed == ["py"]

    asyncio.run(scenario())
