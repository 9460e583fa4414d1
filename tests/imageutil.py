"""Named guest images for the stand-in hypervisor (issue 20), shared by the tests and bench/bench.py."""
import json

EXT4_MAGIC_OFFSET = 1024 + 0x38


def standin_image(images, name, protocol=1, ext4=True, kernel=False, dockerfile=None):
    """An image directory as rootfs/build.py writes it: image.json, and a sparse rootfs.ext4 with
    only an ext4 superblock's magic (the stand-in never reads it); `kernel`: an own vmlinuz."""
    directory = images / name
    directory.mkdir(parents=True)
    with open(directory / "rootfs.ext4", "wb") as f:
        f.truncate(64 << 20)
        if ext4:
            f.seek(EXT4_MAGIC_OFFSET)
            f.write(b"\x53\xef")
    if kernel:
        (directory / "vmlinuz").write_bytes(b"the image's own kernel\n")
    source = {"type": "dockerfile", "dockerfile": dockerfile, "sha256": "0" * 64} if dockerfile else \
        {"type": "debootstrap", "suite": "stable"}
    (directory / "image.json").write_text(json.dumps({
        "format": 1, "name": name, "builtAt": "2026-12-07T00:00:00Z", "source": source, "rootfs": "rootfs.ext4",
        "sizeBytes": 64 << 20, "agent": {"version": "0.1.0", "protocol": protocol, "sha256": "1" * 64},
        "kernel": "vmlinuz" if kernel else None, "initramfs": None}))
    return directory
