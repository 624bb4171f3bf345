"""A photo library of odd files and names through the whole pipeline.

One source tree (built in a temporary folder from a few real photos plus
synthetic files) holds every kind of bad or odd file and name a real photo
library has: empty, cut, repaired and fake images, odd sizes and modes, EXIF
orientations, special files, links, aliases, names that are not UTF-8, hold
reserved characters, newlines, emoji, Unicode forms, Windows device names...

embed, cluster, refine, dedup, enrich, export-swap and embed again run over it
through the command line. Each kind has its own test of its outcome in the
cache (status, reason, damage, skipped, alias) and in the outputs; the
whole-run tests check exit codes, stderr, the source tree (byte-identical
after every step) and the outputs (UTF-8 names, one file per source, pages
whose links resolve, thumbnails and crops cut from the right photo).

A kind whose outcome is wrong keeps the assertion of the right one and is
marked xfail (strict), with the bug in its reason.
"""

import html
import io
import json
import math
import os
import random
import re
import shutil
import socket
import subprocess
import time
import unicodedata
import urllib.parse
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

import sort_faces
import videos
from conftest import DATA, run_cli, thumb_square, tree_fingerprint

STEP_TIMEOUT = 180  # seconds: a step that hangs (a FIFO opened, a loop followed) fails, not blocks

# Real photos: LFW (250x250, mostly one face), taken round-robin over its 10
# people so the name kinds are distinct photos and refine finds facesets.
LFW_PEOPLE = sorted(p.name for p in (DATA / "lfw10").iterdir() if p.is_dir())
LFW = [sorted((DATA / "lfw10" / person).glob("*.jpg")) for person in LFW_PEOPLE]
COUPLE = DATA / "group_photos" / "couple.jpg"  # two faces, 2280x1588


def lfw_photo(number: int) -> Path:
    return LFW[number % len(LFW)][number // len(LFW)]


# ---------------------------------------------------------------------------
# Makers: each writes one entry at `dst` (its folder exists) from a real photo.
# ---------------------------------------------------------------------------


def rgb(photo: Path) -> Image.Image:
    return Image.open(photo).convert("RGB")


def copy_photo(dst: Path, photo: Path, ctx) -> None:
    shutil.copyfile(photo, dst)


def write_bytes(data: bytes):
    def make(dst: Path, photo: Path, ctx) -> None:
        dst.write_bytes(data)
    return make


def save_as(image_format: str, convert: str | None = None, **options):
    def make(dst: Path, photo: Path, ctx) -> None:
        image = rgb(photo)
        (image.convert(convert) if convert else image).save(dst, image_format, **options)
    return make


def truncated_jpeg(dst: Path, photo: Path, ctx) -> None:
    data = photo.read_bytes()
    dst.write_bytes(data[: len(data) // 2])  # no end marker


def repaired_jpeg(dst: Path, photo: Path, ctx) -> None:
    """Cut, then padded with zeros and an end marker: libjpeg fills the rest in."""
    data = COUPLE.read_bytes()
    dst.write_bytes(data[: len(data) // 2] + b"\0" * 2000 + b"\xff\xd9")


def truncated_png(dst: Path, photo: Path, ctx) -> None:
    buffer = io.BytesIO()
    rgb(photo).save(buffer, "PNG")
    dst.write_bytes(buffer.getvalue()[: buffer.tell() * 6 // 10])


def zip_named_jpg(dst: Path, photo: Path, ctx) -> None:
    with zipfile.ZipFile(dst, "w") as bundle:
        bundle.write(photo, arcname="inside.jpg")


def plain_image(size, colour=(120, 90, 60)):
    def make(dst: Path, photo: Path, ctx) -> None:
        Image.new("RGB", size, colour).save(dst, "PNG")
    return make


def huge_png(dst: Path, photo: Path, ctx) -> None:
    """A complete 20000x20000 black RGB PNG of a few MB, written row by row."""
    width = height = 20000

    def chunk(kind, data):
        body = kind + data
        return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")

    packer = zlib.compressobj(9)
    row = b"\0" * (1 + 3 * width)
    idat = b"".join([packer.compress(row) for _ in range(height)] + [packer.flush()])
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    dst.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat)
                    + chunk(b"IEND", b""))


def bomb_header_jpeg(dst: Path, photo: Path, ctx) -> None:
    """A real JPEG whose frame header claims 65000x65000 pixels."""
    data = bytearray(photo.read_bytes())
    sof = next(i for i in range(len(data) - 1) if data[i] == 0xFF and data[i + 1] in (0xC0, 0xC2))
    data[sof + 5: sof + 9] = (65000).to_bytes(2, "big") * 2
    dst.write_bytes(bytes(data))


def sixteen_bit_gray_png(dst: Path, photo: Path, ctx) -> None:
    gray = np.asarray(rgb(photo).convert("L"), dtype=np.uint16) * 257
    Image.fromarray(gray).save(dst, "PNG")  # mode I;16


def sixteen_bit_color(dst: Path, photo: Path, ctx) -> None:
    """48-bit RGB (OpenCV writes 16 bits a channel for PNG and TIFF)."""
    import cv2

    bgr = cv2.imread(str(photo)).astype(np.uint16) * 257
    assert cv2.imwrite(str(dst), bgr)


def palette_png(dst: Path, photo: Path, ctx) -> None:
    """255 colours of the photo plus a transparent border (palette index 255)."""
    image = rgb(photo).quantize(255)
    canvas = Image.new("P", (image.width + 40, image.height + 40), 255)
    canvas.putpalette(image.getpalette()[: 255 * 3] + [255, 0, 255])
    canvas.paste(image, (20, 20))
    canvas.save(dst, "PNG", transparency=255)


def rgba_png(dst: Path, photo: Path, ctx) -> None:
    image = rgb(photo).convert("RGBA")
    alpha = Image.new("L", image.size, 0)
    alpha.paste(255, (10, 10, image.width - 10, image.height - 10))
    image.putalpha(alpha)
    image.save(dst, "PNG")


# EXIF orientation -> the transpose that stores an upright image so that the
# orientation turns it upright again (Pillow's exif_transpose, inverted).
T = Image.Transpose
STORED_FOR = {2: T.FLIP_LEFT_RIGHT, 3: T.ROTATE_180, 4: T.FLIP_TOP_BOTTOM, 5: T.TRANSPOSE,
              6: T.ROTATE_90, 7: T.TRANSVERSE, 8: T.ROTATE_270}
UPRIGHT_BOX = (10, 0, 210, 250)  # 200x250 of a 250x250 LFW photo: not square, not symmetric


def upright(photo: Path) -> Image.Image:
    return rgb(photo).crop(UPRIGHT_BOX)


def exif_oriented(orientation: int, image_format: str = "JPEG"):
    """The upright picture stored turned, with the EXIF orientation that turns
    it back (an orientation out of 1-8 is stored as it is)."""
    def make(dst: Path, photo: Path, ctx) -> None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        stored = upright(photo)
        if orientation in STORED_FOR:
            stored = stored.transpose(STORED_FOR[orientation])
        options = {"quality": 95} if image_format == "JPEG" else {}
        stored.save(dst, image_format, exif=exif.tobytes(), **options)
    return make


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, whole chunk) of each chunk of a PNG."""
    chunks, pos = [], 8
    while pos < len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        chunks.append((data[pos + 4:pos + 8], data[pos:pos + 12 + length]))
        pos += 12 + length
    return chunks


def png_exif_after_pixels(orientation: int):
    """A PNG whose eXIf chunk (the orientation) comes after its pixels."""
    def make(dst: Path, photo: Path, ctx) -> None:
        exif_oriented(orientation, "PNG")(dst, photo, ctx)
        data = dst.read_bytes()
        chunks = png_chunks(data)
        order = [c for k, c in chunks if k not in (b"eXIf", b"IEND")] + \
            [c for k, c in chunks if k == b"eXIf"] + [c for k, c in chunks if k == b"IEND"]
        assert len(order) == len(chunks)
        dst.write_bytes(data[:8] + b"".join(order))
    return make


def jpeg_with_trailing_zip(dst: Path, photo: Path, ctx) -> None:
    """A photo with an archive appended after its end marker (a "polyglot")."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        bundle.writestr("secret.txt", "x" * 4000)
    dst.write_bytes(photo.read_bytes() + buffer.getvalue())


BIG_SIDE = 10050  # 101 MP: over MAX_DECODE_PIXELS, decoded at 1/2
# Two people (photos no other kind uses): one at the top left, one larger at
# the centre right, on a 2010 px picture.
GROUP_SIDE = 2010
GROUP_CROP = (0, 0, 960, 960)  # the top-left person only


def two_people() -> Image.Image:
    picture = Image.new("RGB", (GROUP_SIDE, GROUP_SIDE), (90, 110, 100))
    picture.paste(rgb(LFW[0][9]).resize((750, 750), Image.Resampling.LANCZOS), (60, 60))
    picture.paste(rgb(LFW[1][9]).resize((900, 900), Image.Resampling.LANCZOS), (1040, 960))
    return picture


def over_100_megapixels(dst: Path, photo: Path, ctx) -> None:
    two_people().resize((BIG_SIDE, BIG_SIDE), Image.Resampling.LANCZOS).save(dst, "JPEG",
                                                                            quality=70)


def two_people_small(dst: Path, photo: Path, ctx) -> None:
    two_people().save(dst, "JPEG", quality=90)


def two_people_cropped(dst: Path, photo: Path, ctx) -> None:
    two_people().crop(GROUP_CROP).save(dst, "JPEG", quality=90)


def animated_gif(dst: Path, photo: Path, ctx) -> None:
    """The face first, then a blank frame: only the first frame is embedded."""
    face = rgb(photo)
    face.save(dst, save_all=True, append_images=[Image.new("RGB", face.size)], duration=100)


def folder_with_photo(dst: Path, photo: Path, ctx) -> None:
    dst.mkdir()
    shutil.copyfile(photo, dst / "inner.jpg")


def symlink_to(target: str):
    def make(dst: Path, photo: Path, ctx) -> None:
        os.symlink(target.format(tmp=ctx.tmp, src=ctx.src), dst)
    return make


def symlink_to_outside_photo(dst: Path, photo: Path, ctx) -> None:
    outside = ctx.tmp / "outside" / "target.jpg"
    outside.parent.mkdir(exist_ok=True)
    shutil.copyfile(photo, outside)
    os.symlink(outside, dst)


def symlink_to_outside_folder(dst: Path, photo: Path, ctx) -> None:
    folder = ctx.tmp / "outside_folder"
    if not folder.exists():
        folder.mkdir()
        shutil.copyfile(photo, folder / "shared.jpg")
    os.symlink(folder, dst)


def fifo(dst: Path, photo: Path, ctx) -> None:
    os.mkfifo(dst)


def unix_socket(dst: Path, photo: Path, ctx) -> None:
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(dst))  # the socket file stays after close
    server.close()


def video_of(times):
    """A video (H.264) of the photo shown at these times (seconds), alternately
    as it is and mirrored, so that every frame differs."""
    def make(dst: Path, photo: Path, ctx) -> None:
        still = np.asarray(rgb(photo).resize((320, 240)))[:, :, ::-1]
        videos.write_frames(dst, [np.ascontiguousarray(still[:, ::-1] if i % 2 else still)
                                  for i in range(len(times))], times)
    return make


def mjpeg_growing_frames(dst: Path, photo: Path, ctx) -> None:
    """MJPEG whose header says 320x240 (the photo's first frame) and whose
    second frame is a 16000x12000 JPEG (192 MP): a frame past the decode budget
    the header did not announce."""
    small = np.asarray(rgb(photo).resize((320, 240)))[:, :, ::-1]
    videos.mjpeg_of(dst, [np.ascontiguousarray(small), np.full((12000, 16000, 3), 90, np.uint8)])


def hard_link_of(kind_id: str):
    def make(dst: Path, photo: Path, ctx) -> None:
        os.link(ctx.path(kind_id), dst)
    return make


def copy_of(kind_id: str):
    def make(dst: Path, photo: Path, ctx) -> None:
        shutil.copy2(ctx.path(kind_id), dst)
    return make


def heic(dst: Path, photo: Path, ctx) -> None:
    import pillow_heif

    pillow_heif.register_heif_opener()
    rgb(photo).save(dst, "HEIF", quality=90)


def mimic_hashed_name(of_rel: str):
    """The name safe_dst_name gives `of_rel`, as a file beside it (its tail after
    the last "__"): no reserved character, so it stays as it is."""
    def rel(src: Path) -> str:
        folder = str(Path(of_rel).parent)
        return folder + "/" + sort_faces.safe_dst_name(str(src / of_rel)).split("__")[-1]
    return rel


# ---------------------------------------------------------------------------
# The kinds: where each entry goes, how it is made, and what must come of it.
# ---------------------------------------------------------------------------


@dataclass
class Kind:
    id: str
    rel: str | Callable  # path under the source root, or rel(src) -> that path
    make: Callable
    outcome: str  # face | noface | unreadable | damaged | skipped | alias | folder | ignored
    words: tuple = ()  # in the reason (cache row), the damage, or the stderr line (skipped)
    photo: bool = True  # made from a real photo of its own
    of: str | None = None  # alias: the kind whose content it shares
    check: Callable | None = None  # more checks: check(kind, run)
    xfail: str | None = None  # a bug: the correct outcome is asserted, and fails


def check_pixels(expected, tolerance: float):
    """decode_image shows the picture as meant: `expected(photo)` (RGB array)."""
    def check(kind, run):
        want = np.asarray(expected(run.photo[kind.id]), dtype=np.int16)
        got = sort_faces.decode_image(run.path(kind.id))[0][:, :, ::-1].astype(np.int16)
        assert got.shape == want.shape
        assert np.abs(got - want).mean() < tolerance
    return check


def same(photo):
    return rgb(photo)


def gray(photo):
    return rgb(photo).convert("L").convert("RGB")


def white_border(photo, border):
    image = np.asarray(rgb(photo))
    out = np.full((image.shape[0] + 2 * border, image.shape[1] + 2 * border, 3), 255, np.uint8)
    out[border:-border, border:-border] = image
    return out


def rgba_on_white(photo):
    image = np.asarray(rgb(photo)).copy()
    outside = np.ones(image.shape[:2], bool)
    outside[10:-10, 10:-10] = False
    image[outside] = 255
    return image


def check_orientation(orientation: int):
    def check(kind, run):
        row = run.row(kind)
        assert (run.cache["file_width"][row], run.cache["file_height"][row]) == (200, 250)
        check_pixels(upright, 6)(kind, run)  # not mirrored or turned
        faces = run.faces(kind)
        face = faces[np.argmax(run.cache["face_short"][faces])]
        eyes, mouth = run.cache["kps"][face][:2, 1].mean(), run.cache["kps"][face][3:, 1].mean()
        assert eyes < mouth  # the face is found upright
    return check


def check_orientation_ignored(kind, run):
    row = run.row(kind)
    assert (run.cache["file_width"][row], run.cache["file_height"][row]) == (200, 250)
    check_pixels(upright, 6)(kind, run)


def check_big(kind, run):
    """Decoded at 1/2: the size is the file's, both people are found."""
    row = run.row(kind)
    assert (run.cache["file_width"][row], run.cache["file_height"][row]) == (BIG_SIDE, BIG_SIDE)
    assert len(run.faces(kind)) == 2
    # at full resolution (issue 25): the larger person stands right of the middle
    assert max(run.cache["bbox"][f][0] for f in run.faces(kind)) > BIG_SIDE / 2


def check_dedup_of_a_big_photo(kind, run):
    """dedup judges a >100 MP photo as any other: its downscaled copy (their
    hashes alike) is the same picture; a crop that cuts out its larger, central
    person is not."""
    phash = run.cache["file_phash"]
    assert int(phash[run.row(kind)] ^ phash[run.row(BY_ID[kind.of])]).bit_count() <= 4
    big, crop = run.path(kind.of), run.path("crop_of_100mp_without_its_main_face")
    groups = [{g["keep"]["path"], *(o["path"] for o in g["others"])}
              for g in run.duplicates["visual"]]
    assert any({big, run.path(kind.id)} <= group for group in groups), groups
    assert not any({big, crop} <= group for group in groups), groups


def check_frames(count: int):
    """The video's frames are `count` rows, each a different frame."""
    def check(kind, run):
        sha = run.cache["sha256"][run.row(kind)]
        frames = np.flatnonzero(run.cache["file_video"] == sha)
        assert len(frames) == count, sorted(run.cache["files"][frames])
        assert len(set(run.cache["file_time"][frames])) == count
    return check


def check_first_frame(kind, run):
    assert len(run.faces(kind)) == 1
    check_pixels(same, 4)(kind, run)


def check_inner_photo(kind, run):
    row = run.row_of_path(os.path.join(run.path(kind.id), "inner.jpg"))
    assert row is not None and run.cache["file_status"][row] == "ok"


def check_link_path_kept(kind, run):
    assert run.cache["files"][run.row(kind)] == run.path(kind.id)  # as the user sees it


def check_outside_folder_once(kind, run):
    """Two links to one outside folder (no loop): its photo is embedded once;
    the other link is an alias, or skipped without being called a loop."""
    links = [run.path("link_folder_a"), run.path("link_folder_b")]
    rows = {run.row_of_path(link + "/shared.jpg") for link in links} - {None}
    assert len(rows) == 1
    lines = [line for line in run.err["embed"].splitlines()
             if any(line.startswith(f"skipped: {link}:") for link in links)]
    assert all("loop" not in line for line in lines), lines


def check_repaired_kept_out(kind, run):
    faces = set(run.faces(kind).tolist())
    assert faces  # its intact half still has faces
    kept = {f["face"] for s in run.refined["facesets"] for f in s["faces"]}
    dropped = {d["face"]: d["reason"] for d in run.refined["dropped"]}
    assert not faces & kept
    assert all("damaged" in dropped[f] for f in faces)


def check_unique_output_name(kind, run):
    """The photo is in the raw output under a name of its own, valid UTF-8, in
    each folder that holds one of its faces (and in no other)."""
    name = sort_faces.safe_dst_name(run.path(kind.id))
    name.encode("utf-8")
    assert len(name.encode("utf-8")) <= sort_faces.MAX_NAME_BYTES
    faces = set(run.faces(kind).tolist())
    groups = run.raw_groups()
    holders = [g["folder"] for g in groups if name in g["outputs"]]
    expected = [g["folder"] for g in groups if faces & {f["face"] for f in g.get("faces", [])}]
    assert holders == expected and holders, (name, holders, expected)
    for folder in holders:
        assert (run.out / "raw" / folder / name).is_file()


def check_reserved_name(kind, run):
    check_unique_output_name(kind, run)
    name = sort_faces.safe_dst_name(run.path(kind.id))
    assert not set('<>:"|?*\\\n\r') & set(name) and not name.startswith("-")


# the names Windows keeps for its devices, whatever their extension
WINDOWS_DEVICE_NAMES = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)),
                        *(f"LPT{i}" for i in range(1, 10))}


def check_con(kind, run):
    check_unique_output_name(kind, run)
    stem = sort_faces.safe_dst_name(run.path(kind.id)).split(".")[0].split("~")[0]
    assert stem.upper() not in WINDOWS_DEVICE_NAMES


def check_alias_has_its_own_output(kind, run):
    """Both locations of the content are in the raw output, under two names."""
    names = {sort_faces.safe_dst_name(run.path(k)) for k in (kind.id, kind.of)}
    assert len(names) == 2, names
    for group in run.raw_groups():
        if set(group["outputs"]) & names:
            assert names <= set(group["outputs"]), (group["folder"], names)


def check_one_report_line(kind, run):
    """A file's report is one line, its name escaped: a newline cannot forge
    another report, and control characters never reach the terminal."""
    err = run.err["embed"]
    reports = [line for line in err.splitlines() if line.startswith("unreadable: ")]
    assert len(reports) == run.summary()["unreadable"], reports
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", err), repr(err)


def check_blanks_are_not_one_picture(kind, run):
    """A black and a white frame of one size are different pictures: dedup must
    not report one as a removable duplicate of the other."""
    report = run.duplicates
    blanks = {run.path("blank_black"), run.path("blank_white")}
    for group in report["visual"]:
        members = {group["keep"]["path"], *(o["path"] for o in group["others"])}
        assert len(members & blanks) < 2, group


KINDS = [
    # --- files that are not (whole) images -----------------------------------
    Kind("empty_jpg", "bad/empty.jpg", write_bytes(b""), "unreadable", ("empty file",),
         photo=False),
    Kind("truncated_jpeg", "bad/truncated.jpg", truncated_jpeg, "unreadable", ("truncated",)),
    Kind("repaired_jpeg", "bad/repaired.jpg", repaired_jpeg, "damaged", ("Corrupt JPEG data",),
         photo=False, check=check_repaired_kept_out),
    Kind("truncated_png", "bad/truncated.png", truncated_png, "unreadable", ("truncated",)),
    Kind("random_bytes_jpg", "bad/random.jpg", write_bytes(random.Random(7).randbytes(6000)),
         "unreadable", ("not an image",), photo=False),
    Kind("text_named_jpg", "bad/notes.jpg", write_bytes(b"shopping list: milk, eggs\n" * 20),
         "unreadable", ("not an image",), photo=False),
    Kind("html_named_png", "bad/page.png",
         write_bytes(b"<!DOCTYPE html><html><body><img src=x.png></body></html>\n"),
         "unreadable", ("not an image",), photo=False),
    Kind("zip_named_jpg", "bad/archive.jpg", zip_named_jpg, "unreadable", ("not an image",)),
    Kind("fake_heic", "bad/fake.heic", write_bytes(b"\0\0\0\x18ftypheic" + b"\0" * 200),
         "unreadable", ("not an image",), photo=False),
    Kind("jpeg_header_claims_65000px", "bad/bomb.jpg", bomb_header_jpeg, "unreadable",
         ("too large", "65000x65000")),
    Kind("huge_png_20000px", "bad/huge.png", huge_png, "unreadable", ("too large to decode",),
         photo=False),
    Kind("name_newline_forges_a_report", "bad/broken\nunreadable: forged.jpg",
         write_bytes(b"not a photo\n"), "unreadable", ("not an image",), photo=False,
         check=check_one_report_line),
    Kind("name_terminal_escapes", "bad/esc\x1b[2J\x1b[31mred\r.jpg", write_bytes(b"junk"),
         "unreadable", ("not an image",), photo=False, check=check_one_report_line),
    # --- odd geometry and blank pictures --------------------------------------
    Kind("one_pixel", "odd/one_pixel.png", plain_image((1, 1)), "noface", ("too small",),
         photo=False),
    Kind("thin_641x1", "odd/wide.png", plain_image((641, 1)), "noface", ("too thin", "641x1"),
         photo=False),
    Kind("thin_1x5000", "odd/tall.png", plain_image((1, 5000)), "noface", ("too thin", "1x5000"),
         photo=False),
    Kind("blank_black", "odd/black.png", plain_image((640, 480), (0, 0, 0)), "noface",
         photo=False),
    Kind("blank_white", "odd/white.png", plain_image((640, 480), (255, 255, 255)), "noface",
         photo=False, check=check_blanks_are_not_one_picture),
    # --- images in every mode and format -------------------------------------
    Kind("png_named_jpg", "formats/really_a_png.jpg", save_as("PNG"), "face",
         check=check_pixels(same, 1)),
    Kind("jpeg_named_heic", "formats/really_a_jpeg.heic", copy_photo, "face",
         check=check_pixels(same, 1)),
    Kind("heic", "formats/photo.heic", heic, "face", check=check_pixels(same, 6)),
    Kind("cmyk_jpeg", "formats/cmyk.jpg", save_as("JPEG", convert="CMYK", quality=95), "face",
         check=check_pixels(same, 3)),
    Kind("png_16bit_gray", "formats/gray16.png", sixteen_bit_gray_png, "face",
         check=check_pixels(gray, 1)),
    Kind("png_16bit_rgb", "formats/rgb48.png", sixteen_bit_color, "face",
         check=check_pixels(same, 1)),
    Kind("tiff_16bit_rgb", "formats/rgb48.tif", sixteen_bit_color, "face",
         check=check_pixels(same, 1)),
    Kind("palette_png_transparent", "formats/palette.png", palette_png, "face",
         check=check_pixels(lambda photo: white_border(photo, 20), 4)),
    Kind("rgba_png", "formats/rgba.png", rgba_png, "face", check=check_pixels(rgba_on_white, 1)),
    Kind("grayscale_jpeg", "formats/gray.jpg", save_as("JPEG", convert="L", quality=95), "face",
         check=check_pixels(gray, 2)),
    *[Kind(f"exif_orientation_{o}", f"exif/orientation_{o}.jpg", exif_oriented(o), "face",
           check=check_orientation(o)) for o in range(2, 9)],
    Kind("exif_orientation_out_of_range", "exif/orientation_9.jpg", exif_oriented(9), "face",
         check=check_orientation_ignored),
    Kind("png_exif_orientation_after_pixels", "exif/orientation_6_late.png",
         png_exif_after_pixels(6), "face", check=check_orientation(6)),
    Kind("jpeg_with_trailing_zip", "formats/polyglot.jpg", jpeg_with_trailing_zip, "face",
         check=check_pixels(same, 1)),
    Kind("jpeg_over_100mp", "big/over_100mp.jpg", over_100_megapixels, "face", photo=False,
         check=check_big),
    Kind("crop_of_100mp_without_its_main_face", "big/crop.jpg", two_people_cropped, "face",
         photo=False),
    Kind("downscaled_copy_of_100mp", "big/downscaled_copy.jpg", two_people_small, "face",
         photo=False, of="jpeg_over_100mp", check=check_dedup_of_a_big_photo),
    Kind("progressive_jpeg", "formats/progressive.jpg",
         save_as("JPEG", progressive=True, quality=92), "face", check=check_pixels(same, 3)),
    Kind("animated_gif", "formats/animated.gif", animated_gif, "face", check=check_first_frame),
    Kind("webp", "formats/photo.webp", save_as("WEBP", quality=92), "face",
         check=check_pixels(same, 4)),
    Kind("bmp", "formats/photo.bmp", save_as("BMP"), "face", check=check_pixels(same, 1)),
    # --- entries that are not regular files -----------------------------------
    Kind("video_slideshow_a_frame_every_20_s", "video/slides.mp4",
         video_of([20.0 * i for i in range(6)]), "video", check=check_frames(6)),
    Kind("video_frame_stamped_1e9_s_after_the_first", "video/far.mkv",
         video_of([0.0, 1e9]), "video", ("beyond",), check=check_frames(1)),
    Kind("video_starting_at_1e6_s", "video/late.mkv", video_of([1e6 + i for i in range(4)]),
         "video", check=check_frames(4)),
    Kind("video_frames_larger_than_its_header", "video/grows.mkv", mjpeg_growing_frames,
         "video", ("too large to decode (16000x12000)",), check=check_frames(1)),
    Kind("folder_named_jpg", "special/photo.jpg", folder_with_photo, "folder",
         check=check_inner_photo),
    Kind("fifo_jpg", "special/pipe.jpg", fifo, "skipped", ("FIFO",), photo=False),
    Kind("socket_jpg", "special/sock.jpg", unix_socket, "skipped", ("socket",), photo=False),
    Kind("dangling_symlink", "links/dangling.jpg", symlink_to("{tmp}/nowhere.jpg"), "skipped",
         ("dangling symlink",), photo=False),
    Kind("symlink_to_dev_zero", "links/zero.jpg", symlink_to("/dev/zero"), "skipped",
         ("character device",), photo=False),
    Kind("symlink_loop", "links/loop", symlink_to("{src}"), "skipped", ("symlink loop",),
         photo=False),
    Kind("symlink_outside_tree", "links/outside.jpg", symlink_to_outside_photo, "face",
         check=check_link_path_kept),
    Kind("link_folder_a", "links/folder_a", symlink_to_outside_folder, "folder"),
    Kind("link_folder_b", "links/folder_b", symlink_to_outside_folder, "folder", photo=False,
         check=check_outside_folder_once),
    Kind("alias_original", "alias/a_original.jpg", copy_photo, "face"),
    Kind("hard_link", "alias/b_hardlink.jpg", hard_link_of("alias_original"), "alias",
         photo=False, of="alias_original", check=check_alias_has_its_own_output),
    Kind("byte_identical_copy", "alias/c_copy.jpg", copy_of("alias_original"), "alias",
         photo=False, of="alias_original", check=check_alias_has_its_own_output),
    # --- names ---------------------------------------------------------------
    Kind("name_not_utf8", os.fsdecode(b"names/caf\xe9.jpg"), copy_photo, "face",
         check=check_unique_output_name),
    Kind("folder_not_utf8", os.fsdecode(b"dir\xff\xfe/photo.jpg"), copy_photo, "face",
         check=check_unique_output_name),
    Kind("name_percent_escape_lookalike", "names/caf%E9.jpg", copy_photo, "face",
         check=check_unique_output_name),
    Kind("name_percent", "names/100%.jpg", copy_photo, "face", check=check_unique_output_name),
    *[Kind(f"name_reserved_{label}", f"reserved/a{ch}b.jpg", copy_photo, "face",
           check=check_reserved_name)
      for label, ch in (("colon", ":"), ("question", "?"), ("star", "*"), ("pipe", "|"),
                        ("quote", '"'), ("backslash", "\\"))],
    Kind("name_reserved_angles", "reserved/a<b>.jpg", copy_photo, "face",
         check=check_reserved_name),
    Kind("name_plain_lookalike", "reserved/a_b.jpg", copy_photo, "face",
         check=check_unique_output_name),
    Kind("name_mimics_a_hashed_name", mimic_hashed_name("reserved/a:b.jpg"),
         copy_of("name_reserved_colon"), "alias", photo=False, of="name_reserved_colon",
         check=check_alias_has_its_own_output),
    Kind("name_newline", "names/new\nline.jpg", copy_photo, "face", check=check_reserved_name),
    Kind("name_leading_dash", "names/-rf.jpg", copy_photo, "face", check=check_reserved_name),
    Kind("name_240_bytes", "names/long_" + "é" * 115 + "x.jpg", copy_photo, "face",
         check=check_unique_output_name),
    Kind("name_255_bytes", "names/" + "n" * 251 + ".jpg", copy_photo, "face",
         check=check_unique_output_name),
    Kind("name_nfc", unicodedata.normalize("NFC", "unicode/café.jpg"), copy_photo, "face",
         check=check_unique_output_name),
    Kind("name_nfd", unicodedata.normalize("NFD", "unicode/café.jpg"), copy_photo, "face",
         check=check_unique_output_name),
    Kind("name_emoji", "unicode/\U0001f600 smile \U0001f468\u200d\U0001f469\u200d\U0001f467.jpg",
         copy_photo, "face", check=check_unique_output_name),
    Kind("name_html_and_url_chars", "names/x#y&z<i>%20.jpg", copy_photo, "face",
         check=check_reserved_name),
    Kind("folder_trailing_dot", "trailing dot./photo.jpg", copy_photo, "face",
         check=check_unique_output_name),
    Kind("folder_trailing_space", "trailing space /photo.jpg", copy_photo, "face",
         check=check_unique_output_name),
    Kind("name_space_before_ext", "names/space .jpg", copy_photo, "face",
         check=check_unique_output_name),
    Kind("name_trailing_dot", "names/dot.jpg.", copy_photo, "ignored"),
    Kind("name_windows_device", "names/CON.jpg", copy_photo, "face", check=check_con),
    Kind("name_upper_case_ext", "names/UPPER.JPG", copy_photo, "face",
         check=check_unique_output_name),
    Kind("name_hidden", "names/.hidden.jpg", copy_photo, "face",
         check=check_unique_output_name),
    Kind("deep_40_folders", "/".join(f"d{i:02d}" for i in range(1, 41)) + "/deep.jpg",
         copy_photo, "face", check=check_unique_output_name),
]
BY_ID = {kind.id: kind for kind in KINDS}
assert len(BY_ID) == len(KINDS)
KNOWN_BUGS = {kind.id for kind in KINDS if kind.xfail}


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------


@dataclass
class Run:
    tmp: Path
    src: Path
    rel: dict = field(default_factory=dict)  # kind id -> its path under src
    photo: dict = field(default_factory=dict)  # kind id -> the real photo it was made from
    identity: dict = field(default_factory=dict)  # source path -> LFW person (one face)
    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)  # step -> tree fingerprint after it
    code: dict = field(default_factory=dict)
    out_text: dict = field(default_factory=dict)
    err: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    cache: object = None
    table: dict = field(default_factory=dict)

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    @property
    def cache_path(self) -> Path:
        return self.tmp / "cache" / "c.npz"

    def path(self, kind_id: str) -> str:
        return str(self.src / self.rel[kind_id])

    def row_of_path(self, path: str):
        known = self.table.get(path)
        if known is None:
            return None
        rows = np.flatnonzero(self.cache["sha256"] == known[0])
        return int(rows[0]) if len(rows) else None

    def row(self, kind: Kind) -> int:
        row = self.row_of_path(self.path(kind.id))
        assert row is not None, f"{self.rel[kind.id]!r} has no cache row"
        return row

    def faces(self, kind: Kind) -> np.ndarray:
        return np.flatnonzero(self.cache["face_file"] == self.row(kind))

    def manifest(self, name: str) -> dict:
        return json.loads((self.out / name).read_text(encoding="utf-8"))

    @property
    def raw(self) -> dict:
        return self.manifest("raw/manifest.json")

    @property
    def refined(self) -> dict:
        return self.manifest("refined/refine_manifest.json")

    @property
    def exported(self) -> dict:
        return self.manifest("swap/export_manifest.json")

    @property
    def duplicates(self) -> dict:
        return json.loads(sort_faces.duplicates_path(self.cache_path).read_text(encoding="utf-8"))

    def raw_groups(self) -> list[dict]:
        """Every folder of the raw output with the names its manifest lists."""
        raw = self.raw
        groups = [{"folder": c["name"], "outputs": c["outputs"], "faces": c["faces"]}
                  for c in raw["clusters"]]
        groups.append({"folder": "_singletons", "outputs": raw["singletons"]["outputs"],
                       "faces": raw["singletons"]["faces"]})
        groups.append({"folder": "_noface", "outputs": raw["noface"]["outputs"],
                       "files": raw["noface"]["files"]})
        return groups

    def summary(self, step: str = "embed") -> dict:
        line = next(line for line in self.out_text[step].splitlines()
                    if line.startswith("embed done:"))
        counts = re.findall(r"(\d+) (new|aliases|faces|unreadable|damaged|skipped|crashed|videos)"
                            r"\b(?!\))", line)
        return {key: int(value) for value, key in counts} | \
            {"seen": int(re.search(r"(\d+) files seen", line)[1]),
             "frames": int(re.search(r"(\d+) frames\)", line)[1])}


class Context:
    """What a maker may need: the folders, and the paths of kinds made before it."""

    def __init__(self, run: Run):
        self.tmp, self.src, self.run = run.tmp, run.src, run

    def path(self, kind_id: str) -> Path:
        return self.src / self.run.rel[kind_id]


def build_corpus(tmp: Path) -> Run:
    src = tmp / "src"
    src.mkdir()
    run = Run(tmp=tmp, src=src)
    ctx = Context(run)
    number = 0
    for kind in KINDS:
        run.rel[kind.id] = kind.rel(src) if callable(kind.rel) else kind.rel
        dst = src / run.rel[kind.id]
        dst.parent.mkdir(parents=True, exist_ok=True)
        photo = None
        if kind.photo:
            photo = lfw_photo(number)
            number += 1
            run.photo[kind.id] = photo
            if kind.outcome in ("face", "video"):  # a video: its frames, of the photo
                run.identity[str(dst)] = photo.parent.name
        kind.make(dst, photo, ctx)
    assert number < 90  # LFW[0][9] and LFW[1][9] are two_people's
    return run


STEPS = ("embed", "cluster", "refine", "dedup", "enrich", "export-swap", "embed-again")


def step_argv(step: str, run: Run) -> list:
    cache, out = run.cache_path, run.out
    return {
        "embed": ["embed", run.src, cache, "--model", "buffalo_s"],
        "cluster": ["cluster", cache, out / "raw"],
        "refine": ["refine", cache, out / "refined", "--min-faces", "2", "--min-short", "40",
                   "--min-blur", "10"],
        "dedup": ["dedup", cache],
        "enrich": ["enrich", cache],
        "export-swap": ["export-swap", cache, out / "refined" / "refine_manifest.json",
                        out / "swap", "--min-face-short", "40", "--top-n", "5",
                        "--raw-manifest", out / "raw" / "manifest.json", "--candidates"],
        "embed-again": ["embed", run.src, cache, "--model", "buffalo_s"],
    }[step]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Run:
    tmp = tmp_path_factory.mktemp("hostile")
    run = build_corpus(tmp)
    run.before = tree_fingerprint(run.src)
    for step in STEPS:
        started = time.time()
        try:
            code, out, err = run_cli(*step_argv(step, run), timeout=STEP_TIMEOUT)
        except subprocess.TimeoutExpired as error:  # a hang: recorded; the later steps skip
            code, out, err = None, "", f"timed out after {error.timeout} s"
        run.seconds[step] = round(time.time() - started, 1)
        run.code[step], run.out_text[step], run.err[step] = code, out, err
        run.after[step] = tree_fingerprint(run.src)
        if code not in (0, 1):
            break
    if run.cache_path.exists():
        run.cache = sort_faces.load_cache(run.cache_path)
        run.table = run.cache.path_table()
    return run


# ---------------------------------------------------------------------------
# Each kind's outcome
# ---------------------------------------------------------------------------


def kind_params() -> list:
    return [pytest.param(kind, id=kind.id,
                         marks=[pytest.mark.xfail(reason=kind.xfail, strict=True)]
                         if kind.xfail else [])
            for kind in KINDS]


def reported(err: str, path: str, word: str) -> list[str]:
    """The stderr lines that report `path` with `word` ('unreadable', 'skipped'...).
    A name with control characters is matched by its part before the first one
    (it may be shown escaped)."""
    shown_path = re.split(r"[\x00-\x1f\x7f]", sort_faces.display(path))[0]
    ending = ":" if shown_path == sort_faces.display(path) else ""
    return [line for line in err.splitlines() if line.startswith(f"{word}: {shown_path}{ending}")]


@pytest.mark.parametrize("kind", kind_params())
def test_each_kind_has_its_outcome(run, kind):
    assert run.cache is not None, run.err.get("embed")
    path = run.path(kind.id)
    status, reason, damage = run.cache["file_status"], run.cache["file_reason"], \
        run.cache["file_damage"]
    embed_err = run.err["embed"]
    if kind.outcome in ("face", "noface", "unreadable", "damaged"):
        row = run.row(kind)
        assert run.cache["files"][row] == path  # its own row, not an alias of another
        if kind.outcome == "face":
            assert status[row] == "ok" and reason[row] == "" and damage[row] == "", \
                (status[row], reason[row], damage[row])
            assert len(run.faces(kind)) >= 1
        elif kind.outcome == "damaged":
            assert status[row] != "unreadable" and reason[row] == "", reason[row]
            for word in kind.words:
                assert word in damage[row], damage[row]
            assert len(reported(embed_err, path, "damaged")) == 1, embed_err
        else:
            assert status[row] == kind.outcome, (status[row], reason[row])
            assert damage[row] == "" and len(run.faces(kind)) == 0
            for word in kind.words:
                assert word in reason[row], reason[row]
            if kind.outcome == "unreadable":  # reported once by name, and listed by cluster
                lines = reported(embed_err, path, "unreadable")
                assert len(lines) == 1 and reason[row] in lines[0], embed_err
                assert path in [u["file"] for u in run.raw["unreadable"]]
            else:
                assert sort_faces.safe_dst_name(path) in run.raw["noface"]["outputs"]
    elif kind.outcome == "skipped":  # reported once, never opened, not recorded
        assert path not in run.table and path not in set(run.cache["files"])
        lines = reported(embed_err, path, "skipped")
        assert len(lines) == 1, (path, embed_err)
        for word in kind.words:
            assert word in lines[0], lines[0]
    elif kind.outcome == "alias":  # a location of a row embedded once
        assert path in run.table and path not in set(run.cache["files"])
        assert run.row(kind) == run.row(BY_ID[kind.of])
    elif kind.outcome in ("folder", "ignored"):
        assert path not in run.table and path not in set(run.cache["files"])
        if kind.outcome == "ignored":
            assert sort_faces.display(path) not in embed_err
    elif kind.outcome == "video":  # a row of its own, its frames rows of theirs
        row = run.row(kind)
        assert run.cache["files"][row] == path and status[row] == "video", reason[row]
        for word in kind.words:  # named once, as damaged
            assert word in damage[row], damage[row]
            assert len(reported(embed_err, path, "damaged")) == 1, embed_err
    if kind.check:
        kind.check(kind, run)


def test_the_corpus_has_at_least_30_kinds_of_every_sort():
    assert len(KINDS) >= 30
    outcomes = {kind.outcome for kind in KINDS}
    assert outcomes >= {"face", "noface", "unreadable", "damaged", "skipped", "alias", "folder"}


# ---------------------------------------------------------------------------
# The whole run
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("step", STEPS)
def test_every_step_finishes_cleanly(run, step):
    assert step in run.code, f"not run: an earlier step failed ({run.code})"
    code, err = run.code[step], run.err[step]
    assert code in (0, 1), (code, err[-3000:])
    assert "Traceback" not in err and "Logging error" not in err, err[-3000:]
    assert "unexpected error" not in err, err[-3000:]
    if step.startswith("embed"):  # unreadable, damaged and skipped files: exit 1, finished
        assert code == sort_faces.EXIT_PARTIAL


def test_the_source_tree_is_byte_identical_after_every_step(run):
    for step in STEPS:
        assert run.after.get(step) == run.before, step
    assert tree_fingerprint(run.src) == run.before


def expected_count(outcome: str) -> int:
    return sum(kind.outcome == outcome for kind in KINDS)


def test_the_embed_summary_counts_each_kind(run):
    summary = run.summary()
    # a second link to one folder is no problem: its photos are taken once, through
    # the first link (see link_folder_b), neither skipped nor aliases
    assert summary["skipped"] == expected_count("skipped"), summary
    assert summary["aliases"] == expected_count("alias"), summary
    assert summary["unreadable"] == expected_count("unreadable"), summary
    videos = [kind for kind in KINDS if kind.outcome == "video"]
    damaged_videos = sum(bool(kind.words) for kind in videos)  # their words: the damage
    assert summary["damaged"] == expected_count("damaged") + damaged_videos, summary
    assert summary["crashed"] == 0, summary
    rows = sum(expected_count(o) for o in ("face", "noface", "unreadable", "damaged", "video"))
    rows += 2  # special/photo.jpg/inner.jpg and the outside folder's photo
    frames = int((run.cache["file_video"] != "").sum())  # rows of their own, not files
    assert summary["new"] == rows == run.cache.n_files - frames, summary
    assert summary["videos"] == len(videos) and summary["frames"] == frames, summary
    assert summary["faces"] == run.cache.n_faces >= expected_count("face")


def test_a_second_embed_finds_nothing_new_and_reports_the_same(run):
    again, first = run.summary("embed-again"), run.summary()
    assert again["new"] == 0 and again["aliases"] == 0 and again["faces"] == 0, again
    for key in ("seen", "unreadable", "damaged", "skipped"):
        assert again[key] == first[key], (key, again, first)
    assert run.cache.n_files == first["new"] + first["frames"]


def test_no_photo_is_embedded_twice(run):
    assert len(set(run.cache["sha256"])) == run.cache.n_files
    assert len(set(run.cache["files"])) == run.cache.n_files


def test_every_output_name_is_valid_utf8(run):
    for folder, dirs, files in os.walk(os.fsencode(run.out)):
        for name in dirs + files:
            name.decode("utf-8")  # raises on a name that is not UTF-8
            assert not re.search(rb"[\x00-\x1f\x7f]", name), name


def test_every_review_page_is_utf8_and_its_links_resolve(run):
    for page in (run.out / step / "index.html" for step in ("raw", "refined", "swap")):
        text = page.read_bytes().decode("utf-8")
        links = re.findall(r'(?:src|href)="([^"]+)"', text)
        assert links
        for link in links:
            target = urllib.parse.unquote(html.unescape(link), errors="surrogateescape")
            assert not target.endswith("/missing"), (page, link)  # a thumbnail not made
            if target.startswith("file://"):  # a video, at a frame's time
                video, time_s = target[len("file://"):].rsplit("#t=", 1)
                assert Path(video).is_file() and float(time_s) >= 0, (page, link)
                continue
            assert (page.parent / target).exists(), (page, link)


def test_each_output_folder_holds_what_its_manifest_lists(run):
    refined = run.refined
    groups = [dict(g, root="raw") for g in run.raw_groups()]
    groups += [{"folder": s["name"], "outputs": s["outputs"], "root": "refined"}
               for s in refined["facesets"]]
    for group in groups:
        folder = run.out / group["root"] / group["folder"]
        on_disk = sorted(os.listdir(folder)) if folder.exists() else []
        assert on_disk == sorted(group["outputs"]), group["folder"]
    exported = run.exported
    assert exported["summary"]["crops"] > 0
    for folder, entries in ((run.out / "swap", exported["facesets"]),
                            (run.out / "swap" / "_candidates", exported["candidates"])):
        for entry in entries:
            pngs = sorted(os.listdir(folder / entry["name"]))
            assert pngs == sorted(c["png"] for c in entry["crops"]), entry["name"]
            for bundle in entry.get("bundles", []):
                with zipfile.ZipFile(run.out / "swap" / bundle["file"]) as fsz:
                    assert len(fsz.namelist()) == bundle["pngs"]


def test_no_two_sources_share_an_output_name(run):
    """Each folder of the raw and refine outputs holds one file per location of
    its photos. (A kind with a known bug is left to its own xfail test.)"""
    cache = run.cache
    locations = sort_faces.file_locations(cache)
    known = {run.path(k) for k in KNOWN_BUGS}
    groups = [dict(g, root="raw") for g in run.raw_groups()]
    groups += [{"folder": s["name"], "outputs": s["outputs"], "faces": s["faces"],
                "root": "refined"} for s in run.refined["facesets"]]
    for group in groups:
        if "faces" in group:
            rows = {int(cache["face_file"][f["face"]]) for f in group["faces"]}
            sources = {p for row in rows for p in locations[row]}
        else:
            sources = set(group["files"])
        names = {sort_faces.output_name(p) for p in sources - known}
        assert len(names) == len(sources - known), group["folder"]
        assert names <= set(group["outputs"]), group["folder"]


def test_every_faceset_is_one_person(run):
    """No face on a wrong photo: the photos of a faceset (each made from one LFW
    photo) are all of one person."""
    cache, refined = run.cache, run.refined
    assert len(refined["facesets"]) >= 5
    for faceset in refined["facesets"]:
        people = {run.identity.get(str(cache["files"][cache["face_file"][f["face"]]])
                                   .rsplit("#t=", 1)[0])  # a frame: its video's
                  for f in faceset["faces"]} - {None}
        assert len(people) == 1, (faceset["name"], people)


def shown(rgb_pixels: np.ndarray, box, size: int) -> np.ndarray:
    """The square `box` of an image (black outside it) resized to size x size."""
    x0, y0, x1, y1 = box
    left, top = math.floor(x0), math.floor(y0)
    right, bottom = max(math.ceil(x1), left + 1), max(math.ceil(y1), top + 1)
    canvas = np.zeros((bottom - top, right - left, 3), np.uint8)
    height, width = rgb_pixels.shape[:2]
    a, b, c, d = max(left, 0), max(top, 0), min(right, width), min(bottom, height)
    if a < c and b < d:
        canvas[b - top:d - top, a - left:c - left] = rgb_pixels[b:d, a:c]
    image = Image.fromarray(canvas).resize((size, size), Image.Resampling.LANCZOS,
                                           box=(x0 - left, y0 - top, x1 - left, y1 - top))
    return np.asarray(image, dtype=np.int16)


def test_every_thumbnail_and_crop_shows_its_own_face(run):
    """The review thumbnails and the exported crops are cut from the right photo
    at the right place, whatever its format, mode or orientation."""
    cache = run.cache
    locations = sort_faces.file_locations(cache)
    decoded = {}

    def pixels(row):
        """The decode_image pixels, and where the cache's full-resolution
        coordinates lie in them (a photo above 100 MP is decoded reduced)."""
        if row not in decoded:
            bgr, _w, _h, _damage, view = sort_faces.decode_image_viewed(locations[row][0])
            decoded[row] = bgr, view
        return decoded[row]

    thumbs = run.out / "raw" / sort_faces.THUMBS_DIR_NAME
    checked = 0
    for group in run.raw_groups():
        for record in group.get("faces", []):
            face = record["face"]
            row = int(cache["face_file"][face])
            name = sort_faces.thumb_file_name(locations[row][0], cache["bbox"][face])
            got = np.asarray(Image.open(thumbs / name).convert("RGB"), dtype=np.int16)
            bgr, view = pixels(row)
            box = thumb_square(view.to_view(cache["bbox"][face]), sort_faces.THUMB_PAD)
            want = shown(bgr[:, :, ::-1], box, sort_faces.THUMB_SIZE)
            assert np.abs(got - want).mean() < 8, (group["folder"], locations[row][0])
            checked += 1
    assert checked == cache.n_faces
    exported = run.exported
    side, pad = exported["parameters"]["out_size"], exported["parameters"]["pad_ratio"]
    for entry in exported["facesets"]:
        for crop in entry["crops"]:
            if crop["blacked_out"]:
                continue  # another face painted over: not the photo's pixels any more
            face = crop["face"]
            row = int(cache["face_file"][face])
            assert crop["source"] == locations[row][0]
            bgr, view = pixels(row)
            want = sort_faces.crop_square(bgr, sort_faces.square_crop_box(
                view.to_view(cache["bbox"][face]), pad), side).astype(np.int16)
            got = np.asarray(Image.open(run.out / "swap" / entry["name"] / crop["png"])
                             .convert("RGB"), dtype=np.int16)[:, :, ::-1]
            assert np.abs(got - want).mean() < 1, (entry["name"], crop["png"], crop["source"])


def test_dedup_reports_the_aliases_as_byte_identical(run):
    group = next(g for g in run.duplicates["byte_identical"]
                 if g["keep"] == run.path("alias_original"))
    assert sorted(group["others"]) == sorted([run.path("hard_link"),
                                              run.path("byte_identical_copy")])
