"""Videos: the faces in a library's videos, sampled by presentation time with
PyAV, one cache row a frame, resumable inside a video, in every step (issue 14).

The fast tier decodes synthetic videos (made with PyAV from the shared photos
in a temporary folder) without the model; the model tier embeds the shared
real clip and synthetic videos of known people."""

import collections
import json
import re
import pickle
import shutil
import subprocess
import sys
import urllib.parse
from pathlib import Path

import cv2
import numpy as np
import pytest

import sort_faces
import videos
from conftest import DATA, EXPORT, REFINE, ROOT, embed_quiet, kill_embed_after, run_cli

CLIP = videos.CLIP
LIN = DATA / "face_recognition" / "lin_manuel_miranda"


def solid_frames(values, size=(64, 48)) -> list:
    return [np.full((size[1], size[0], 3), v, np.uint8) for v in values]


# --- fast tier: decoding and sampling, no model ----------------------------------


@pytest.mark.fast
def test_a_frame_location_is_its_label_and_travels_to_workers():
    where = sort_faces.FrameLocation("/videos/a clip.mp4", 12.3456)
    assert where == "/videos/a clip.mp4#t=12.346" and where.time == 12.3456
    back = pickle.loads(pickle.dumps(where))
    assert isinstance(back, sort_faces.FrameLocation) and back.video == "/videos/a clip.mp4"
    name = sort_faces.output_name(where)
    assert re.search(r"#t=12\.346~[0-9a-f]{10}\.jpg$", name) and "/" not in name
    # a photo named as the still would be keeps a name of its own
    photo = sort_faces.output_name("/videos/a clip.mp4#t=12.346.jpg")
    tricky = sort_faces.output_name(f"/videos/{name}")
    assert len({name, photo, tricky}) == 3
    assert sort_faces.frame_key("ab" * 32, 12.0) == sort_faces.frame_key("ab" * 32, 12.0004)
    assert sort_faces.frame_key("ab" * 32, 12.0) != sort_faces.frame_key("ab" * 32, 13.0)


@pytest.mark.fast
def test_a_variable_frame_rate_samples_the_frame_on_screen(tmp_path):
    times = [0.0, 0.1, 0.15, 0.9, 1.05, 2.5, 2.6, 4.0, 4.2]
    path = videos.write_frames(tmp_path / "vfr.mp4", solid_frames([20 * i for i in range(9)]), times)
    got = [(target, round(t, 2), int(round(bgr.mean() / 20)))
           for target, t, bgr, _damage in sort_faces.video_samples(str(path), 1.0, 0.0)]
    # the frame shown at each time: the last one whose time is not after it
    assert got == [(0, 0.0, 0), (1, 0.9, 3), (2, 1.05, 4), (3, 2.6, 6), (4, 4.0, 7)]


@pytest.mark.fast
def test_a_keyframe_near_a_sample_stands_for_it_once(tmp_path):
    """Keyframes every 1.2 s (10 fps): a sample takes one within 0.5 s of it
    (it decodes alone), never one another sample took, else the frame on screen."""
    path = videos.write_frames(tmp_path / "gop.mp4", solid_frames([5 * i for i in range(45)]),
                        [i / 10 for i in range(45)], gop=12)
    got = [(target, round(t, 2), bgr.mean())
           for target, t, bgr, _damage in sort_faces.video_samples(str(path), 1.0, 0.5)]
    assert [(target, t) for target, t, _mean in got] == [(0, 0.0), (1, 1.2), (2, 2.4),
                                                         (3, 3.0), (4, 3.6)]
    assert all(abs(mean - 50 * t) < 5 for _target, t, mean in got)  # those frames' pixels
    on_screen = [round(t, 2) for _target, t, _bgr, _damage in
                 sort_faces.video_samples(str(path), 1.0, 0.0)]
    assert on_screen == [0.0, 1.0, 2.0, 3.0, 4.0]


@pytest.mark.fast
def test_samples_finer_than_the_frame_rate_give_each_frame_once(tmp_path):
    path = videos.write_frames(tmp_path / "slow.mp4", solid_frames([20 * i for i in range(8)]),
                        [i / 4 for i in range(8)])  # 4 frames a second, 2 s
    got = [round(t, 2) for _target, t, _bgr, _damage in sort_faces.video_samples(
        str(path), 0.05, 0.0)]
    assert got == [i / 4 for i in range(8)]


@pytest.mark.fast
@pytest.mark.parametrize("column, value, said", [
    ("file_time", np.nan, "file_time"), ("file_time", np.inf, "file_time"),
    ("file_time", -1.0, "file_time"), ("file_video", "../../etc", "file_video"),
    ("meta", "abc", "video_every"), ("meta", 0, "video_every")])
def test_a_tampered_video_column_is_one_clear_error(tmp_path, column, value, said):
    cache = tmp_path / "c.npz"
    shape = {"files": ["/v/a.mp4#t=0.000", "/v/a.mp4"], "sha256": ["a" * 64, "b" * 64],
             "file_status": ["noface", "video"], "file_video": ["b" * 64, ""],
             "file_time": [0.0, 0.0]}
    arrays = {k: np.array(v) for k, v in shape.items()}
    meta = {"schema_version": 2, "video_every": 1.0}
    if column == "meta":
        meta["video_every"] = value
    else:
        arrays[column] = arrays[column].astype(object if isinstance(value, str) else float)
        arrays[column][0] = value
        arrays[column] = arrays[column].astype(str if isinstance(value, str) else float)
    np.savez(cache, meta=np.array(json.dumps(meta)), **arrays)
    with pytest.raises(sort_faces.UserError, match=said):
        sort_faces.load_cache(cache)


@pytest.mark.fast
def test_rotation_metadata_and_ten_bit_hevc(tmp_path):
    photo = videos.people_photos("madonna", 1)[0]
    upright = videos.letterbox(photo, 320, 240)
    turned = videos.make_video(tmp_path / "turned.mp4", [(photo, 1)], size=(320, 240),
                               rotation=90, turn_pixels=1)
    hevc = videos.make_video(tmp_path / "ten_bit.mkv", [(photo, 1)], size=(320, 240),
                             codec="libx265", pix_fmt="yuv420p10le")
    for path in (turned, hevc):
        (_target, _t, bgr, _damage), = sort_faces.video_samples(str(path), 1.0)
        assert bgr.shape == upright.shape and bgr.dtype == np.uint8
        assert np.abs(bgr.astype(int) - upright).mean() < 12, path.name  # upright, same picture
    assert sort_faces.probe_video(str(hevc))["codec"] == "hevc"


@pytest.mark.fast
def test_bad_videos_are_one_clear_reason(tmp_path):
    photo = videos.people_photos("madonna", 1)[0]
    good = videos.make_video(tmp_path / "good.mp4", [(photo, 4)], size=(320, 240), gop=10)
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "notes.mov").write_text("not a video at all")
    videos.truncate(good, tmp_path / "cut.mp4")
    videos.audio_only(tmp_path / "sound.mp4")
    mkv = videos.make_video(tmp_path / "a.mkv", [(photo, 1)], size=(320, 240))
    (tmp_path / "codec.mkv").write_bytes(mkv.read_bytes().replace(b"V_MPEG4/ISO/AVC",
                                                                  b"V_QUUX4/ISO/AVC"))
    expected = {"empty.mp4": "empty file", "notes.mov": "not a video",
                "cut.mp4": r"index \(moov\) is missing", "sound.mp4": "no video stream",
                "codec.mkv": "codec"}
    for name, said in expected.items():
        with pytest.raises(sort_faces.UnreadableImage, match=said):
            list(sort_faces.video_samples(str(tmp_path / name), 1.0))


@pytest.mark.fast
def test_truncated_with_its_index_first_and_damaged_in_the_middle_keep_what_decodes(tmp_path):
    photo = videos.people_photos("madonna", 1)[0]
    good = videos.make_video(tmp_path / "good.mp4", [(photo, 8)], size=(320, 240), gop=10,
                             faststart=True)
    targets = [float(t) for t in range(8)]
    assert len(list(sort_faces.video_samples(str(good), 1.0))) == 8
    cut = videos.truncate(good, tmp_path / "cut.mp4", keep=0.6)
    kept = list(sort_faces.video_samples(str(cut), 1.0))
    assert 1 <= len(kept) < 8 and [k[0] for k in kept] == targets[:len(kept)]
    damaged = videos.damage_middle(good, tmp_path / "damaged.mp4", at=0.5, length=3000)
    after = list(sort_faces.video_samples(str(damaged), 1.0))
    assert len(after) >= 6 and after[-1][0] == 7.0  # the frames past the damage decode too


# --- issue 25: the frame embedded is the frame every step shows; a frame is
# taken once, and a video's work is bounded by its frames ---------------------


def every_frame(path: Path) -> dict:
    """pts -> pixels of every frame of a video, decoded from its start."""
    import av

    with av.open(str(path)) as container:
        return {frame.pts: frame.to_ndarray(format="bgr24")
                for frame in container.decode(container.streams.video[0])}


def two_people_clip(path: Path, codec: str = "libx264", gop: int | None = None,
                    size=(320, 240)) -> Path:
    """3 s at 10 fps: Madonna until 1.2 s, then Ben Affleck (a keyframe every
    `gop` frames; every frame is one in MJPEG)."""
    first, second = (videos.letterbox(videos.people_photos(who, 1)[0], *size)
                     for who in ("madonna", "ben_affleck"))
    return videos.write_frames(path, [first] * 12 + [second] * 18, [i / 10 for i in range(30)],
                        codec=codec, gop=gop)


@pytest.mark.fast
@pytest.mark.parametrize("name, codec, gop", [("mjpeg.mkv", "mjpeg", None),
                                              ("short_gop.mp4", "libx264", 4),
                                              ("camera.mts", "libx264", 4)])  # inexact seeks
@pytest.mark.parametrize("every", [1.0, 0.3])
def test_a_still_is_exactly_the_frame_that_was_sampled(tmp_path, name, codec, gop, every):
    """All-intra MJPEG and H.264 with a keyframe every 0.4 s (in MP4, and in
    MPEG-TS, whose seeks land past their target): the frame a later step reads
    for a sample's still is the sampled frame itself, not a keyframe near it
    (which here shows the other person)."""
    path = two_people_clip(tmp_path / name, codec, gop)
    truth = every_frame(path)
    index = sort_faces.index_video(str(path))
    assert index.pts.tolist() == sorted(truth) and not index.problem
    plan = sort_faces.video_plan(index, every)
    assert len({pts for _t, pts, _k, _s in plan}) == len(plan) > 0
    sampled = list(sort_faces.video_frames_at(str(path), [(pts, key) for _t, pts, key, _s in plan]))
    assert [pts for pts, _bgr, _damage in sampled] == sorted(pts for _t, pts, _k, _s in plan)
    for (_target, pts, _key, time_s), (_pts, bgr, _damage) in zip(sorted(plan, key=lambda x: x[1]),
                                                                  sampled):
        assert np.array_equal(bgr, truth[pts])
        still = sort_faces.read_video_frame(sort_faces.FrameLocation(str(path), time_s))
        assert np.array_equal(still, truth[pts]), (time_s, pts)


@pytest.mark.fast
def test_a_frame_is_taken_once_however_it_is_sampled(tmp_path):
    """A 6-frame slideshow (a frame every 20 s), sampling finer than the frame
    rate, and a frame stamped 10^9 s after the first: each frame at most once,
    the work bounded by the frames, not by the duration the header gives."""
    shades = solid_frames([30 * i for i in range(6)])
    slides = videos.write_frames(tmp_path / "slides.mp4", shades, [20.0 * i for i in range(6)])
    got = [round(t) for _target, t, _bgr, _damage in sort_faces.video_samples(str(slides), 1.0)]
    assert got == [0, 20, 40, 60, 80, 100]
    clip = videos.write_frames(tmp_path / "ten_fps.mp4", solid_frames([8 * i for i in range(30)]),
                        [i / 10 for i in range(30)])
    fine = [t for _target, t, _bgr, _damage in sort_faces.video_samples(str(clip), 0.04)]
    assert len(fine) == len(set(fine)) == 30
    far = videos.write_frames(tmp_path / "far.mkv", shades[:2], [0.0, 1e9])
    index = sort_faces.index_video(str(far))
    assert index.probe["duration"] > 1e8  # the header believes it
    plan = sort_faces.video_plan(index, 1.0)
    assert [round(s[3]) for s in plan] == [0] and "beyond" in index.problem
    between = videos.write_frames(tmp_path / "gap.mkv", shades[:2], [0.0, 5e8])
    assert [round(s[3]) for s in sort_faces.video_plan(sort_faces.index_video(str(between)),
                                                       0.04)] == [0, 5e8]


@pytest.mark.fast
def test_a_video_that_starts_late_counts_from_its_first_frame(tmp_path):
    late = videos.write_frames(tmp_path / "late.mkv", solid_frames([40 * i for i in range(5)]),
                        [1e6 + i for i in range(5)])
    index = sort_faces.index_video(str(late))
    assert index.times.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0] and not index.problem
    frames = list(sort_faces.video_samples(str(late), 1.0))
    assert [t for _target, t, _bgr, _damage in frames] == [0.0, 1.0, 2.0, 3.0, 4.0]
    still = sort_faces.read_video_frame(sort_faces.FrameLocation(str(late), 3.0))
    assert abs(float(still.mean()) - 120) < 3


@pytest.mark.fast
def test_plan_video_samples_is_bounded_by_the_frames():
    times = np.array([0.0, 0.5, 1e6, 1e6 + 0.04])
    targets, frames = sort_faces.plan_video_samples(times, np.ones(4, bool), 0.04, 1.0)
    assert frames.tolist() == [0, 1, 2] and targets.tolist() == [0.0, 1.0, 1e6]
    many = np.arange(100_000) / 20  # 83 minutes at 20 fps, sampled every 0.04 s
    targets, frames = sort_faces.plan_video_samples(many, np.zeros(len(many), bool), 1 / 20,
                                                    0.04)
    assert len(set(frames.tolist())) == len(frames) == len(many) and \
        (np.diff(targets) > 0).all()


@pytest.mark.fast
def test_a_frame_larger_than_its_header_is_refused_before_it_is_converted(tmp_path):
    """The header says 64x64; frames 2 and 4 are 16000x12000 (192 MP): those
    are refused with the reason, the others decode, and the process stays
    within the memory of one decoded frame (converting one to BGR took 0.58 GB
    more, and embedding it more still)."""
    path = videos.mjpeg_of(tmp_path / "grows.mkv", [np.full((h, w, 3), 128, np.uint8)
                                                   for w, h in [(64, 64), (16000, 12000)] * 2])
    script = f"""
import resource, sys
sys.path.insert(0, {str(ROOT)!r})
import sort_faces
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
plan = sort_faces.video_plan(sort_faces.index_video({str(path)!r}), 1.0)
for pts, bgr, why in sort_faces.video_frames_at({str(path)!r}, [(s[1], s[2]) for s in plan]):
    print(pts, bgr is not None and bgr.shape, why)
grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print("grew", grew // 1024)
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == "0 (64, 64, 3) " and lines[2] == "2000 (64, 64, 3) "
    for line in (lines[1], lines[3]):
        assert line.endswith("False a frame too large to decode (16000x12000)"), line
    assert int(lines[-1].split()[1]) < 550  # MB: one 16000x12000 frame in FFmpeg is 288


# --- the model tier: real footage and synthetic videos of known people -----------


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
    """The shared clip and Lin-Manuel Miranda's photo, with an alias copy of
    the clip, embedded and clustered."""
    tmp = tmp_path_factory.mktemp("clip")
    src = tmp / "src"
    (src / "copy").mkdir(parents=True)
    shutil.copy2(CLIP, src / CLIP.name)
    shutil.copy2(CLIP, src / "copy" / "same clip.mp4")
    for photo in LIN.iterdir():
        shutil.copy2(photo, src / photo.name)
    cache = tmp / "c.npz"
    summary = embed_quiet(src, cache)
    manifest = sort_faces.cluster(cache, tmp / "raw", quiet=True)
    return {"tmp": tmp, "src": src, "cache": cache, "summary": summary, "manifest": manifest}


def test_frames_and_the_photo_are_one_person_and_the_crowd_is_not(clip_run):
    cache = sort_faces.load_cache(clip_run["cache"])
    summary = clip_run["summary"]
    assert summary["videos"] == 1 and summary["aliases"] == 1  # the copy embedded once
    assert summary["frames"] == 10  # 9.2 s, one a second
    frames = np.flatnonzero(cache["file_video"] != "")
    assert len(frames) == 10 and (cache["file_status"] == "video").sum() == 1
    faces_in = np.bincount(cache["face_file"], minlength=cache.n_files)
    crowd = {int(r) for r in frames if faces_in[r] >= 3}  # the audience shots
    assert crowd
    photo = next(int(f) for f in range(cache.n_faces)
                 if cache["file_video"][cache["face_file"][f]] == "")
    lin = next(e for e in clip_run["manifest"]["clusters"]
               if photo in {f["face"] for f in e["faces"]})
    rows = [int(cache["face_file"][f["face"]]) for f in lin["faces"] if f["face"] != photo]
    assert len(rows) >= 4 and len(set(rows)) == len(rows)  # he is in a frame once
    assert not crowd & set(rows)
    assert all(f["file"].startswith(str(clip_run["src"])) for f in lin["faces"])


def test_stills_in_the_outputs_and_time_links_on_the_page(clip_run):
    out = clip_run["tmp"] / "raw"
    manifest = clip_run["manifest"]
    stills = sorted(p for e in manifest["clusters"] for p in (out / e["name"]).glob("*#t=*.jpg"))
    assert stills and not list((out / "_noface").glob("*.jpg"))
    for still in stills[:3]:
        image = cv2.imread(str(still))
        assert image.shape == (360, 640, 3)
    names = {p.name for p in stills}
    assert any("same clip.mp4#t=" in n for n in names)  # every location of a frame, as photos
    page = (out / "index.html").read_text()
    import re

    links = re.findall(r'href="file://([^"#]*\.mp4)#t=\d+\.\d"', page)  # the video at a time
    assert links and {Path(urllib.parse.unquote(link)) for link in links} <= \
        {clip_run["src"] / CLIP.name, clip_run["src"] / "copy" / "same clip.mp4"}
    assert re.search(r"clip\.mp4 at \d+\.\d s", page)  # the time, shown


def test_dedup_reports_consecutive_samples_of_one_shot(tmp_path):
    photos = videos.people_photos("madonna", 2)
    src = tmp_path / "src"
    src.mkdir()
    video = videos.make_video(src / "two shots.mp4", [(photos[0], 4), (photos[1], 4)],
                              size=(640, 480))
    shutil.copy2(video, src / "copy.mp4")
    cache = tmp_path / "c.npz"
    embed_quiet(src, cache)
    report = sort_faces.dedup(cache, quiet=True)
    groups = [sorted(x["path"] for x in [g["keep"], *g["others"]]) for g in report["visual"]]
    assert len(groups) == 2 and all(len(g) == 4 for g in groups)  # one a shot
    assert all("#t=" in p for g in groups for p in g)
    # the copy is one byte-identical group (the video), and only it could be removed
    assert [len(g["others"]) for g in report["byte_identical"]] == [1]
    assert report["byte_identical"][0]["bytes_each"] == video.stat().st_size
    assert report["summary"]["removable_files"] == 1


def test_export_swap_from_frames_collapses_a_shot(tmp_path, pack_dir):
    """A refine output and roop bundles from a video of one person in five
    shots of two seconds: each bundle crop is one face (roop-unleashed's
    loader takes one face a PNG, at det 640 and 320), one crop a shot."""
    import zipfile

    detector = sort_faces.load_face_analysis(str(pack_dir), ["detection"],
                                             ["CPUExecutionProvider"], 640)
    photos = videos.people_photos("jerry_seinfeld", 5)
    src = tmp_path / "src"
    src.mkdir()
    videos.make_video(src / "interview.mp4", [(p, 2) for p in photos], size=(1280, 720))
    cache = tmp_path / "c.npz"
    embed_quiet(src, cache)
    refined = sort_faces.refine(cache, tmp_path / "refined", quiet=True,
                                **dict(REFINE, min_faces=3))
    assert refined["facesets"]
    sort_faces.enrich(cache, quiet=True)
    export = sort_faces.export_swap(cache, tmp_path / "refined" / "refine_manifest.json",
                                    tmp_path / "swap", quiet=True, **EXPORT)
    big = export["facesets"][0]
    shots = {crop["source"].rsplit("#t=", 1)[0] + f"@{int(float(crop['source'].rsplit('#t=', 1)[1]) // 2)}"
             for crop in big["crops"]}
    assert len(big["crops"]) == len(shots) <= 5  # one crop a shot, not one a sample
    with zipfile.ZipFile(tmp_path / "swap" / big["bundles"][-1]["file"]) as bundle:
        names = bundle.namelist()
        assert len(names) == len(big["crops"])
        for name in names:
            image = cv2.imdecode(np.frombuffer(bundle.read(name), np.uint8), cv2.IMREAD_COLOR)
            for size in (640, 320):
                boxes, _ = detector.det_model.detect(image, input_size=(size, size))
                assert len(boxes) == 1, (name, size)


def test_a_kill_inside_a_video_resumes_there(tmp_path):
    photos = videos.people_photos("mindy_kaling", 4)
    src = tmp_path / "src"
    src.mkdir()
    videos.make_video(src / "long.mp4", [(p, 30) for p in photos], size=(640, 360), fps=5)
    reference = tmp_path / "ref.npz"
    embed_quiet(src, reference, workers=2)
    killed = tmp_path / "killed.npz"
    kill_embed_after(src, killed, chunks=3, flush_every=8)
    partial = sort_faces.load_cache(killed)
    done = int((partial["file_video"] != "").sum())
    assert 0 < done < 120 and (partial["file_status"] != "video").all()
    summary = embed_quiet(src, killed, workers=1)
    assert summary["frames"] == 120 - done  # resumed where it stopped, not from the start
    a, b = sort_faces.load_cache(reference), sort_faces.load_cache(killed)
    assert sorted(a["files"]) == sorted(b["files"]) and a.n_faces == b.n_faces
    assert np.all((a["embeddings"] @ b["embeddings"].T).max(axis=1) > 0.999)


def test_bad_videos_are_reported_and_the_run_goes_on(tmp_path):
    photo = videos.people_photos("elton_john", 1)[0]
    src = tmp_path / "src"
    src.mkdir()
    good = videos.make_video(src / "good.mp4", [(photo, 3)], size=(640, 360))
    videos.truncate(good, src / "cut.mp4")
    whole = videos.make_video(tmp_path / "whole.mp4", [(photo, 8)], size=(640, 360), gop=10,
                              faststart=True)
    videos.truncate(whole, src / "cut_after_index.mp4", keep=0.4)
    (src / "empty.MP4").write_bytes(b"")
    (src / "letter.avi").write_text("Dear ...")
    videos.audio_only(src / "voice.m4a.mp4")
    shutil.copy2(videos.people_photos("elton_john", 2)[1], src / "photo.jpg")
    cache = tmp_path / "c.npz"
    code, _out, err = run_cli("embed", src, cache, "--model", "buffalo_s", "--quiet", timeout=300)
    assert code == 1, err  # finished, with files reported
    loaded = sort_faces.load_cache(cache)
    status = dict(zip([Path(f).name for f in loaded["files"]], loaded["file_status"]))
    reason = dict(zip([Path(f).name for f in loaded["files"]], loaded["file_reason"]))
    assert status["good.mp4"] == "video" and status["photo.jpg"] == "ok"
    for name, said in {"cut.mp4": "moov", "empty.MP4": "empty", "letter.avi": "not a video",
                       "voice.m4a.mp4": "no video stream"}.items():
        assert status[name] == "unreadable" and said in reason[name], (name, reason[name])
    damage = dict(zip([Path(f).name for f in loaded["files"]], loaded["file_damage"]))
    assert status["cut_after_index.mp4"] == "video" and "stop at" in damage["cut_after_index.mp4"]
    assert not damage["good.mp4"]


def test_videos_added_later_are_folded_in_by_extend(tmp_path):
    photos = videos.people_photos("ben_affleck", 6)
    src = tmp_path / "src"
    src.mkdir()
    for p in photos[:4]:
        shutil.copy2(p, src / p.name)
    cache = tmp_path / "c.npz"
    embed_quiet(src, cache)
    raw = sort_faces.cluster(cache, tmp_path / "raw", quiet=True)
    ben = max(raw["clusters"], key=lambda e: e["size"])["name"]
    videos.make_video(src / "later.mov", [(photos[4], 2), (photos[5], 2)], size=(640, 480))
    embed_quiet(src, cache, video_every=1.0)
    with pytest.raises(sort_faces.UserError, match="video-every 1"):
        embed_quiet(src, cache, video_every=0.5)
    record = sort_faces.extend(cache, tmp_path / "raw", quiet=True)["extend_raw"]
    joined = record["joined"].get(ben, [])
    assert len(joined) >= 3  # the new frames of Ben joined his person
    manifest = json.loads((tmp_path / "raw" / "manifest.json").read_text())
    entry = next(e for e in manifest["clusters"] if e["name"] == ben)
    assert any(n.endswith(".jpg") and "later.mov#t=" in n for n in entry["outputs"])


def test_people_by_time_span_join_their_photos_in_a_turned_video(tmp_path):
    """A portrait phone video (pixels stored turned, display matrix 90): the
    first 4 s show a photo of Madonna, the next 4 s one of Elton John; those
    photos are in the tree too. Each span's frames join the person of its own
    photo's face (so they were turned upright), never the other's."""
    madonna, elton = (videos.people_photos(p, 1)[0] for p in ("madonna", "elton_john"))
    src = tmp_path / "src"
    src.mkdir()
    for photo in (madonna, elton):
        shutil.copy2(photo, src / f"{photo.parent.name}.jpg")
    videos.make_video(src / "phone.mov", [(madonna, 4), (elton, 4)], size=(640, 480),
                      rotation=90, turn_pixels=1)
    cache = tmp_path / "c.npz"
    embed_quiet(src, cache)
    manifest = sort_faces.cluster(cache, tmp_path / "raw", quiet=True)
    placed = 0
    for entry in manifest["clusters"]:
        files = {Path(f["file"]).name for f in entry["faces"]}
        for name in (n for n in files if "#t=" in n):
            span, other = ("madonna.jpg", "elton_john.jpg") if \
                float(name.rsplit("#t=", 1)[1]) < 4 else ("elton_john.jpg", "madonna.jpg")
            assert span in files and other not in files, (name, sorted(files))
            placed += 1
    assert placed >= 6  # the 8 samples' faces, nearly all with their photo


def embed_image(app, image_path: Path) -> np.ndarray:
    """The embeddings of every face the model finds in an image file."""
    photo = sort_faces.PhotoPixels(str(image_path))
    return sort_faces.embed_photo(app, photo, 640, 512)["embeddings"]


def test_every_still_in_every_output_is_the_face_that_was_embedded(tmp_path, pack_dir):
    """Issue 25: clips whose face changes from Madonna to Ben Affleck between
    two keyframes (MJPEG, all keyframes; H.264 with one every 0.4 s), beside
    photos of both. Every frame's still in the cluster and refine outputs, and
    every export crop from a frame, shows the face that was embedded for it
    (cosine >= 0.99 with the cached embedding; the other person is ~0.1)."""
    src = tmp_path / "src"
    src.mkdir()
    size = (640, 480)
    two_people_clip(src / "mjpeg.mkv", "mjpeg", size=size)
    two_people_clip(src / "short_gop.mp4", "libx264", gop=4, size=size)
    for who in ("madonna", "ben_affleck"):
        for photo in videos.people_photos(who, 3):
            shutil.copy2(photo, src / f"{who}_{photo.name}")
    cache_path = tmp_path / "c.npz"
    embed_quiet(src, cache_path, video_every=0.3)
    cache = sort_faces.load_cache(cache_path)
    app = sort_faces.load_face_analysis(str(pack_dir), ["detection", "recognition"],
                                        ["CPUExecutionProvider"], 640)
    raw = sort_faces.cluster(cache_path, tmp_path / "raw", quiet=True)
    refined = sort_faces.refine(cache_path, tmp_path / "refined", quiet=True,
                                **dict(REFINE, min_faces=3))
    sort_faces.enrich(cache_path, quiet=True)
    export = sort_faces.export_swap(cache_path, tmp_path / "refined" / "refine_manifest.json",
                                    tmp_path / "swap", quiet=True, **EXPORT)
    checked = 0
    for out, entries in ((tmp_path / "raw", raw["clusters"]),
                         (tmp_path / "refined", refined["facesets"])):
        for entry in entries:
            for face in entry["faces"]:
                if "#t=" not in face["file"]:
                    continue
                video, time_s = face["file"].rsplit("#t=", 1)
                row = int(cache["face_file"][face["face"]])
                location = sort_faces.FrameLocation(video, float(cache["file_time"][row]))
                found = embed_image(app, out / entry["name"] / sort_faces.output_name(location))
                best = float((found @ cache["embeddings"][face["face"]]).max())
                assert best >= 0.99, (out.name, entry["name"], face["file"], best)
                checked += 1
    assert checked >= 2 * 10  # both clips' samples, in both outputs
    crops = 0
    for entry in export["facesets"]:
        for crop in entry["crops"]:
            if "#t=" in crop["source"]:
                found = embed_image(app, tmp_path / "swap" / entry["name"] / crop["png"])
                assert float((found @ cache["embeddings"][crop["face"]]).max()) >= 0.9, crop
                crops += 1
    assert crops


def test_a_slideshow_and_a_far_frame_are_each_frame_once_and_the_run_ends(tmp_path):
    """Issue 25: a 6-frame slideshow (a frame every 20 s) gives 6 rows, a
    frame stamped 10^9 s after the first grows nothing without end, a video
    that starts at 10^6 s is not damaged for it, and 0.04 s sampling of a
    10 fps clip gives one row a frame."""
    photos = videos.people_photos("madonna", 3) + videos.people_photos("elton_john", 3)
    shots = [videos.letterbox(p, 320, 240) for p in photos]
    src = tmp_path / "src"
    src.mkdir()
    videos.write_frames(src / "slides.mp4", shots, [20.0 * i for i in range(6)])
    videos.write_frames(src / "far.mkv", shots[:2], [0.0, 1e9])
    videos.write_frames(src / "late.mkv", shots, [1e6 + i for i in range(6)])
    cache_path = tmp_path / "c.npz"
    summary = embed_quiet(src, cache_path)
    cache = sort_faces.load_cache(cache_path)
    rows = collections.Counter(Path(f.rsplit("#t=", 1)[0]).name
                               for f in cache["files"] if "#t=" in f)
    assert rows == {"slides.mp4": 6, "far.mkv": 1, "late.mkv": 6}
    damage = dict(zip([Path(f).name for f in cache["files"]], cache["file_damage"]))
    assert not damage["slides.mp4"] and not damage["late.mkv"] and "beyond" in damage["far.mkv"]
    assert summary["frames"] == 13
    fine = tmp_path / "fine"
    fine.mkdir()
    videos.write_frames(fine / "ten_fps.mp4", [shots[i // 5] for i in range(30)],
                 [i / 10 for i in range(30)])
    summary = embed_quiet(fine, tmp_path / "fine.npz", video_every=0.04)
    assert summary["frames"] == 30


def test_a_rebuild_keeps_the_stills_of_a_video_gone_since(tmp_path, caplog):
    """A video deleted from the source since embed can give no still: a
    rebuild keeps the stills the output made of it (a copy of the frame as it
    was embedded), says so, and a new output leaves the video out with a line.
    A video replaced by another keeps none (a still has no sha256 to check)."""
    src = tmp_path / "src"
    src.mkdir()
    clip = two_people_clip(src / "two.mp4")
    cache = tmp_path / "c.npz"
    embed_quiet(src, cache, video_every=0.5)
    raw = tmp_path / "raw"
    sort_faces.cluster(cache, raw, quiet=True)
    stills = {p.relative_to(raw): p.read_bytes() for p in raw.rglob("*#t=*.jpg")}
    assert stills
    clip.unlink()
    sort_faces.cluster(cache, raw, quiet=True)
    assert {p.relative_to(raw): p.read_bytes() for p in raw.rglob("*#t=*.jpg")} == stills
    assert "(or videos) are gone or changed since embed" in caplog.text
    sort_faces.cluster(cache, raw, quiet=True)  # and again (the kept stills are linked twice)
    assert {p.relative_to(raw): p.read_bytes() for p in raw.rglob("*#t=*.jpg")} == stills
    caplog.clear()
    sort_faces.cluster(cache, tmp_path / "new", quiet=True)
    assert not list((tmp_path / "new").rglob("*#t=*.jpg"))
    assert caplog.text.count("two.mp4 out of") == len({p.parent for p in stills})
    # a video replaced by another (and not embedded again) gives no still, and none is kept:
    # a still cannot be checked against the cache, and the new video's frame is another picture
    two_people_clip(clip, size=(352, 256))
    caplog.clear()
    sort_faces.cluster(cache, raw, quiet=True)
    assert not list(raw.rglob("*#t=*.jpg"))
    assert "two.mp4 out of" in caplog.text and "not the picture the cache has" in caplog.text
