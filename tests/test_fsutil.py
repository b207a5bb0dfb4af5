

def test_atomic_file_into_a_device_writes_into_it_and_keeps_it(tmp_path):
    """--json /dev/null (or /dev/stdout) must not replace the device node with a regular file."""
    import os
    import stat

    from prunus.io.fsutil import write_text

    write_text("/dev/null", "{}\n")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_atomic_file_through_a_symlink_keeps_the_link(tmp_path):
    from prunus.io.fsutil import write_text

    target = tmp_path / "real.json"
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    write_text(link, "new")
    assert link.is_symlink() and target.read_text() == "new"
