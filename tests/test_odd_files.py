"""Odd files and names in a photo library, each through the steps it meets:
images too thin for a face, a PNG too large to decode, names that collide once
flattened or are not UTF-8, unreadable and special files (reported on every
run, counted), a JPEG that libjpeg repairs, a GIF, and a link the file system
cannot make. (tests/test_odd_library.py runs a whole library of such files
through every step; these are the cases found first, issue 17.)"""

import html
import json
import os
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import sort_faces
from conftest import (DATA, REFINE, copy_photos, embed_quiet, last_log, run_cli,
                      tree_fingerprint)


# ---------------------------------------------------------------------------
# Odd geometry and memory
# ---------------------------------------------------------------------------


def write_png_rows(path: Path, width: int, height: int) -> None:
    """A real, complete RGB PNG of width x height black pixels, written row by
    row, so a huge image is a small file made in little memory."""
    def chunk(kind, data):
        body = kind + data
        return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")

    packer = zlib.compressobj(9)
    row = b"\0" * (1 + 3 * width)
    compressed = [packer.compress(row) for _ in range(height)] + [packer.flush()]
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", b"".join(compressed)) + chunk(b"IEND", b""))


def test_thin_images_are_no_face_and_every_other_file_is_embedded(tmp_path):
    src = copy_photos(tmp_path / "src", 8)
    for name, size in (("wide.png", (641, 1)), ("tall.png", (1, 5000)), ("sliver.png", (4000, 3))):
        Image.new("RGB", size, (120, 90, 60)).save(src / name)
    summary = embed_quiet(src, tmp_path / "c.npz")
    assert summary["new"] == 11 and summary["unreadable"] == 0 and summary["faces"] >= 8
    cache = sort_faces.load_cache(tmp_path / "c.npz")
    status = dict(zip(map(os.path.basename, cache["files"]), cache["file_status"]))
    reason = dict(zip(map(os.path.basename, cache["files"]), cache["file_reason"]))
    for name in ("wide.png", "tall.png", "sliver.png"):
        assert status[name] == "noface" and "too thin" in reason[name]
    assert sort_faces.too_small_for_faces(641, 1, 640)
    assert not sort_faces.too_small_for_faces(4000, 3000, 640)


@pytest.mark.fast
def test_a_huge_png_is_refused_with_its_reason_not_decoded(tmp_path):
    path = tmp_path / "huge.png"
    write_png_rows(path, 20000, 20000)
    assert path.stat().st_size < 5_000_000
    with pytest.raises(sort_faces.UnreadableImage, match="too large to decode within 1024 MB"):
        sort_faces.decode_image(str(path))
    reason = sort_faces.decode_memory_problem("PNG", "RGB", 20000, 20000, 2, 0)
    assert reason and "PNG cannot be decoded at a reduced scale" in reason
    # a JPEG of the same size decodes at 1/2 in the DCT, well inside the budget
    assert sort_faces.decode_memory_problem("JPEG", "RGB", 20000, 20000, 2, 0, common=True) is None
    # a 16-bit scan of 100 MP would need its float copy too
    assert sort_faces.decode_memory_problem("TIFF", "I;16", 10000, 10000, 1, 0)


# ---------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------


def test_colliding_and_undecodable_names_go_through_every_step(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    sharon = sorted((DATA / "lfw10" / "Ariel_Sharon").glob("*.jpg"))
    names = ["a:b.jpg", "a?b.jpg", "a_b.jpg", "a__b.jpg"]
    for name, photo in zip(names, sharon):
        shutil.copy2(photo, src / name)
    (src / "a").mkdir()
    shutil.copy2(sharon[4], src / "a" / "_b.jpg")  # flattens like a__b.jpg
    raw_name = os.fsdecode(b"caf\xe9_\xff.jpg")  # Latin-1 bytes: not UTF-8
    shutil.copy2(sharon[5], src / raw_name)
    before = tree_fingerprint(src)
    cache = tmp_path / "c.npz"
    code, out, err = run_cli("embed", src, cache, "--model", "buffalo_s")
    assert code == 0 and "Traceback" not in err, err
    code, out, err = run_cli("cluster", cache, tmp_path / "raw")
    assert code == 0 and "Traceback" not in err, err
    manifest = json.loads((tmp_path / "raw" / "manifest.json").read_text())
    person = max(manifest["clusters"], key=lambda c: c["images"])
    assert person["images"] == 6 and len(set(person["outputs"])) == 6
    assert sorted(os.listdir(tmp_path / "raw" / person["name"])) == sorted(person["outputs"])
    for name in person["outputs"]:
        name.encode("utf-8")  # output names are valid UTF-8 on every file system
    assert any("%E9_%FF" in name for name in person["outputs"])
    code, out, err = run_cli("refine", cache, tmp_path / "refined", "--min-faces", "3",
                             "--min-short", "40", "--min-blur", "10")
    assert code == 0 and "Traceback" not in err, err
    page = (tmp_path / "raw" / "index.html").read_bytes().decode("utf-8")  # valid UTF-8
    assert "caf\ufffd_\ufffd.jpg" in page
    logs = Path(os.environ["FACESETS_LOG_DIR"])
    assert all("Logging error" not in p.read_text(errors="replace") for p in logs.glob("*.log"))
    assert tree_fingerprint(src) == before


@pytest.mark.fast
def test_safe_dst_name_is_unique_for_names_that_flatten_alike():
    paths = ["/p/a:b.jpg", "/p/a?b.jpg", "/p/a_b.jpg", "/p/a__b.jpg", "/p/a/_b.jpg",
             "/p/a/b.jpg", "/p__a/b.jpg", os.fsdecode(b"/p/\xff.jpg"), "/p/%FF.jpg",
             "/p/a.jpg.", "/p/a.jpg"]
    names = [sort_faces.safe_dst_name(p) for p in paths]
    assert len(set(names)) == len(names), names
    assert sort_faces.safe_dst_name("/p/a_b.jpg") == "p__a_b.jpg"  # a plain name stays plain


# ---------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------


def test_known_unreadable_files_are_reported_on_every_run_and_exit_1(tmp_path):
    src = copy_photos(tmp_path / "src", 3)
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    cache = tmp_path / "c.npz"
    for _run in range(2):  # the second run finds nothing new, and still says so
        code, out, err = run_cli("embed", src, cache, "--model", "buffalo_s")
        assert code == sort_faces.EXIT_PARTIAL, err
        assert "1 unreadable" in out and "broken.jpg" in (err if _run == 0 else
                                                         last_log("embed"))
    sort_faces.cluster(cache, tmp_path / "raw", quiet=True)  # and on the review page
    page = (tmp_path / "raw" / "index.html").read_text()
    assert "_unreadable" in page and "1 file that could not be read" in page
    reason = json.loads((tmp_path / "raw" / "manifest.json").read_text())["unreadable"][0]
    assert html.escape(f"{reason['file']}: {reason['reason']}") in page


def test_special_files_are_reported_once_and_counted(tmp_path):
    import socket

    src = copy_photos(tmp_path / "src", 2)
    os.symlink(tmp_path / "nowhere.jpg", src / "dangling.jpg")
    os.mkfifo(src / "pipe.jpg")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(src / "sock.jpg"))
    os.symlink(src, src / "loop")
    try:
        code, out, err = run_cli("embed", src, tmp_path / "c.npz", "--model", "buffalo_s")
    finally:
        server.close()
    assert code == sort_faces.EXIT_PARTIAL and "4 skipped" in out, out + err
    for words in ("dangling symlink", "FIFO", "socket", "symlink loop"):
        assert err.count(words) == 1, (words, err)


def test_a_jpeg_libjpeg_repairs_is_marked_damaged_and_kept_out_of_facesets(tmp_path):
    src = copy_photos(tmp_path / "src", 6, sets=("lfw10",))
    whole = (DATA / "group_photos" / "couple.jpg").read_bytes()
    (src / "repaired.jpg").write_bytes(whole[: len(whole) // 2] + b"\0" * 2000 + b"\xff\xd9")
    _bgr, _w, _h, damage = sort_faces.decode_image_checked(str(src / "repaired.jpg"))
    assert "Corrupt JPEG data" in damage
    cache_path = tmp_path / "c.npz"
    summary = embed_quiet(src, cache_path)
    assert summary["damaged"] == 1 and sort_faces.embed_incomplete(summary)
    cache = sort_faces.load_cache(cache_path)
    row = list(map(os.path.basename, cache["files"])).index("repaired.jpg")
    assert "Corrupt JPEG data" in cache["file_damage"][row]
    faces = np.flatnonzero(cache["face_file"] == row)
    assert len(faces) >= 1  # its intact half still has faces
    manifest = sort_faces.refine(cache_path, tmp_path / "refined", quiet=True,
                                 **dict(REFINE, min_faces=1))
    kept = {f["face"] for s in manifest["facesets"] for f in s["faces"]}
    dropped = {d["face"]: d["reason"] for d in manifest["dropped"]}
    for face in faces:
        assert face not in kept and "damaged" in dropped[face]


def test_gif_is_embedded_by_its_first_frame(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    face = Image.open(DATA / "face_recognition" / "barack_obama" / "obama.jpg").convert("RGB")
    blank = Image.new("RGB", face.size, (0, 0, 0))
    face.save(src / "animated.gif", save_all=True, append_images=[blank], duration=100)
    summary = embed_quiet(src, tmp_path / "c.npz")
    assert summary["new"] == 1 and summary["faces"] == 1


# ---------------------------------------------------------------------------
# File systems
# ---------------------------------------------------------------------------


@pytest.mark.fast
def test_a_link_that_cannot_be_made_is_a_copy(tmp_path, monkeypatch):
    """Windows without the right to make symlinks, or a file system without
    links: the photo is copied, never left out."""
    source = tmp_path / "photo.jpg"
    source.write_bytes(b"pixels")

    def refuse(*_args):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "symlink", refuse)
    monkeypatch.setattr(os, "link", refuse)
    for link in ("symlink", "hardlink"):
        target = tmp_path / f"{link}.jpg"
        assert sort_faces.materialise(str(source), target, link) == "copy"
        assert target.read_bytes() == b"pixels" and not target.is_symlink()


def test_a_rebuild_links_in_nothing_from_outside_out(tmp_path):
    """An output whose copy was replaced by a hardlink to a file outside it
    (same size and time as the photo, other bytes) and whose _thumbs is a link
    to a folder outside it: the rebuild copies that photo anew and makes its
    thumbnails again, so every copy equals its photo and nothing outside OUT
    gains a link or changes; a copy still its own is linked in, rebuild after
    rebuild."""
    src = tmp_path / "src"
    for person in ("Ariel_Sharon", "Colin_Powell"):
        (src / person).mkdir(parents=True)
        for photo in sorted((DATA / "lfw10" / person).glob("*.jpg"))[:2]:
            shutil.copy2(photo, src / person / photo.name)
    cache, out, outside = tmp_path / "c.npz", tmp_path / "out", tmp_path / "outside"
    embed_quiet(src, cache)
    sort_faces.cluster(cache, out, quiet=True)
    copies = sorted(out.glob("person_*/*.jpg"))
    assert len(copies) >= 2
    source_of = {p: next(s for s in src.rglob("*.jpg")
                         if sort_faces.output_name(str(s)) == p.name) for p in copies}
    outside.mkdir()
    other = outside / "other.jpg"  # the photo's size and time, not its bytes
    other.write_bytes(b"Z" * copies[0].stat().st_size)
    shutil.copystat(copies[0], other)
    copies[0].unlink()
    os.link(other, copies[0])
    (out / "_thumbs").rename(outside / "thumbs")
    (out / "_thumbs").symlink_to(outside / "thumbs")
    before = tree_fingerprint(outside)
    links = {p: p.stat().st_nlink for p in outside.rglob("*") if p.is_file()}

    sort_faces.cluster(cache, out, quiet=True)
    assert tree_fingerprint(outside) == before
    assert {p: p.stat().st_nlink for p in outside.rglob("*") if p.is_file()} == \
        {p: (1 if p == other else n) for p, n in links.items()}
    assert not (out / "_thumbs").is_symlink() and any((out / "_thumbs").glob("*.jpg"))
    for copy in copies:
        assert copy.read_bytes() == source_of[copy].read_bytes(), copy
        assert copy.stat().st_nlink == 1, copy
    kept = {p: p.stat().st_ino for p in copies}
    sort_faces.cluster(cache, out, quiet=True)
    assert {p: p.stat().st_ino for p in copies} == kept  # its own copies: linked in
