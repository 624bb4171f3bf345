"""Close-ups: every face, whatever its size in the frame (issue 26). Close-ups,
selfies and tight face crops made from the shared photos (in temporary
folders) are found by every step that detects, with the identity of the
uncropped photo's face; ordinary photos keep exactly the faces they had.

The fast tier checks the second look's rule on boxes; the model tier runs the
real detector on real photos."""

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

import sort_faces
import videos
from conftest import DATA, EXPORT, REFINE, embed_quiet

SECOND = sort_faces.SECOND_LOOK


def around(image: np.ndarray, box, fill: float, side: int) -> np.ndarray:
    """A `side` px square centred on the box, its long side `fill` of the
    square (black where the square leaves the photo)."""
    x1, y1, x2, y2 = (float(v) for v in box[:4])
    scale = side * fill / max(x2 - x1, y2 - y1)
    matrix = np.array([[scale, 0, side / 2 - (x1 + x2) / 2 * scale],
                       [0, scale, side / 2 - (y1 + y2) / 2 * scale]], np.float32)
    return cv2.warpAffine(image, matrix, (side, side), borderValue=0,
                          flags=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)


# --- fast tier: the rule ------------------------------------------------------


@pytest.mark.fast
def test_the_second_look_runs_only_where_a_face_may_be_too_large():
    box = lambda side: np.array([[10, 10, 10 + side * 0.75, 10 + side, 0.9]])  # noqa: E731
    long_side = 1000  # the detector's input is 640: 1.56 px of the photo a pixel there
    assert sort_faces.needs_second_look(np.zeros((0, 5)), long_side, 640)  # nothing found
    small = SECOND["trigger_px"] * long_side / 640 * 0.9
    assert not sort_faces.needs_second_look(box(small), long_side, 640)
    large = SECOND["trigger_px"] * long_side / 640 * 1.1
    assert sort_faces.needs_second_look(box(large), long_side, 640)
    both = np.concatenate([box(small), box(large)])
    assert not sort_faces.needs_second_look(both, long_side, 640)  # an ordinary photo
    # a first pass at the second look's size or finer sees the whole frame already
    assert not sort_faces.needs_second_look(np.zeros((0, 5)), long_side, SECOND["det_size"])


@pytest.mark.fast
def test_the_second_look_keeps_only_what_the_first_could_not_see():
    long_side = 640  # one pixel a pixel of the detector's input
    first = np.array([[0, 0, 150, 200, 0.9]])
    huge = [300, 0, 300 + 0.75 * 500, 500, 0.8]  # 500 px: past the first pass's reach
    same = [5, 5, 150, 205, 0.9]  # the first pass's face, found again
    smaller = [300, 300, 400, 430, 0.7]  # one the first pass should have found: not its to add
    second = np.array([huge, same, smaller])
    assert sort_faces.second_look_keeps(first, second, long_side, 640).tolist() == [0]
    assert sort_faces.second_look_keeps(np.zeros((0, 5)), second, long_side, 640).tolist() == [0]
    assert sort_faces.second_look_keeps(first, np.zeros((0, 5)), long_side, 640).tolist() == []


# --- the model tier -------------------------------------------------------------


def subjects(count: int = 6) -> list[Path]:
    """One photo of each of `count` people (five_celebs and lfw10)."""
    photos = []
    for collection in ("five_celebs", "lfw10"):
        for person in sorted(p for p in (DATA / collection).iterdir() if p.is_dir()):
            photos.append(sorted(q for q in person.iterdir() if q.suffix == ".jpg")[-1])
    return photos[:: max(1, len(photos) // count)][:count]


@pytest.fixture(scope="module")
def close_ups(tmp_path_factory, pack_dir):
    """Close-ups at 50%, 70%, 90% and 100% fill of a 1080 px square, and tight
    crops of 100 and 250 px, of six people's photos, embedded beside the
    photos themselves; the embedding of each photo's largest face."""
    tmp = tmp_path_factory.mktemp("close_ups")
    src = tmp / "src"
    src.mkdir()
    app = sort_faces.load_face_analysis(str(pack_dir), ["detection"], ["CPUExecutionProvider"],
                                        640)
    made = {}
    for index, photo in enumerate(subjects()):
        image = cv2.imread(str(photo))
        boxes, _kps = app.det_model.detect(image, input_size=(640, 640))
        box = boxes[np.argmax((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))]
        shutil.copy2(photo, src / f"{index}_photo.jpg")
        cases = {f"fill{int(f * 100)}": around(image, box, f, 1080) for f in (0.5, 0.7, 0.9, 1.0)}
        cases.update({f"crop{side}": around(image, box, 0.95, side) for side in (100, 250)})
        for name, picture in cases.items():
            cv2.imwrite(str(src / f"{index}_{name}.jpg"), picture, [cv2.IMWRITE_JPEG_QUALITY, 95])
            made[f"{index}_{name}.jpg"] = (f"{index}_photo.jpg", box)
    cache = tmp / "c.npz"
    embed_quiet(src, cache)
    return {"tmp": tmp, "src": src, "cache": cache, "made": made}


def faces_of(cache, name: str) -> np.ndarray:
    rows = [row for row, path in enumerate(cache["files"]) if Path(path).name == name]
    return np.flatnonzero(np.isin(cache["face_file"], rows))


def test_every_close_up_and_crop_keeps_its_face_and_identity(close_ups):
    cache = sort_faces.load_cache(close_ups["cache"])
    for name, (photo, box) in close_ups["made"].items():
        original = faces_of(cache, photo)
        subject = original[np.argmax(sort_faces.box_iou([box[:4]], cache["bbox"][original])[0])]
        found = faces_of(cache, name)
        assert len(found) == 1, (name, len(found))
        cosine = float(cache["embeddings"][found[0]] @ cache["embeddings"][subject])
        assert cosine >= 0.85, (name, cosine)
        # key points inside the box, face_short of the box: the view it was found in
        box_found, kps = cache["bbox"][found[0]], cache["kps"][found[0]]
        assert (kps >= box_found[:2] - 1).all() and (kps <= box_found[2:] + 1).all(), name
        assert abs(cache["face_short"][found[0]] - sort_faces.face_short_edge(box_found)[0]) < 1


def test_every_close_up_is_enriched(close_ups):
    """enrich re-detects each close-up's face: its landmarks, not 'nomatch'."""
    sort_faces.enrich(close_ups["cache"], quiet=True)
    cache = sort_faces.load_cache(close_ups["cache"])
    close = np.concatenate([faces_of(cache, name) for name in close_ups["made"]])
    status = cache.extra["enrich_status"][close]
    assert (status == "ok").all(), dict(zip(cache["files"][cache["face_file"][close]], status))
    centre = cache.extra["landmark_2d_106"][close].mean(axis=1)
    boxes = cache["bbox"][close]
    assert ((centre >= boxes[:, :2]) & (centre <= boxes[:, 2:])).all()


def test_tight_crops_of_one_person_export_as_crops_roop_re_detects(tmp_path, pack_dir):
    """Tight crops of eight photos of Colin Powell (the face filling the frame,
    as a dataset's or another tool's crops): refine makes them a faceset, and
    export-swap crops every face so that roop-unleashed's loader re-detects it
    at det 640 and 320 (export checks that for every crop it writes)."""
    app = sort_faces.load_face_analysis(str(pack_dir), ["detection"], ["CPUExecutionProvider"],
                                        640)
    src = tmp_path / "src"
    src.mkdir()
    for index, photo in enumerate(videos.people_photos("Colin_Powell", 8, "lfw10")):
        image = cv2.imread(str(photo))
        boxes, _kps = app.det_model.detect(image, input_size=(640, 640))
        box = boxes[np.argmax((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))]
        side = 400 if index % 2 else 150
        cv2.imwrite(str(src / f"crop_{index}.jpg"), around(image, box, 1.0, side))
    cache_path = tmp_path / "c.npz"
    summary = embed_quiet(src, cache_path)
    assert summary["faces"] == 8 and summary["noface"] == 0, summary
    refined = sort_faces.refine(cache_path, tmp_path / "refined", quiet=True,
                                **dict(REFINE, min_faces=4, min_short=0.0, min_blur=0.0))
    assert len(refined["facesets"]) == 1 and refined["facesets"][0]["size"] >= 6, refined
    export = sort_faces.export_swap(cache_path, tmp_path / "refined" / "refine_manifest.json",
                                    tmp_path / "swap", quiet=True,
                                    **dict(EXPORT, min_face_short=0.0, top_n=8), enrich_first=True)
    entry = export["facesets"][0]
    assert not entry["skipped"], entry["skipped"]  # none "not re-detected in the crop"
    assert len(entry["crops"]) == refined["facesets"][0]["size"] - len(entry["dropped"])
    assert len(entry["crops"]) >= 5, entry["dropped"]
    # no padding asked for: padded all the same as far as roop's detector needs
    tight = sort_faces.export_swap(cache_path, tmp_path / "refined" / "refine_manifest.json",
                                   tmp_path / "swap0", quiet=True,
                                   **dict(EXPORT, min_face_short=0.0, top_n=8, pad_ratio=0.0))
    assert not tight["facesets"][0]["skipped"]
    assert len(tight["facesets"][0]["crops"]) == len(entry["crops"])


class Recorded:
    """A detector that keeps what each of its passes found."""

    def __init__(self, det_model):
        self.det_model, self.results = det_model, []

    def detect(self, image, **options):
        self.results.append(self.det_model.detect(image, **options))
        return self.results[-1]


def test_ordinary_photos_keep_exactly_their_faces(pack_dir, tmp_path):
    """The shared photos and 12 MP phone photos made from them: every face of
    the first pass alone, at IoU >= 0.98 and cosine >= 0.99, and no other
    face, but where the first pass found none: there only a face that fills
    the frame, of the person the photo shows. Of the shared photos that is one
    close-up (Ben Affleck's val_2.jpg, his face spanning 0.81 of it)."""
    from test_reduced_decode import phone_photos

    app = sort_faces.load_face_analysis(str(pack_dir), ["detection", "recognition"],
                                        ["CPUExecutionProvider"], 640)

    def first_pass(det_model, image, det_size):
        return det_model.detect(image, input_size=(det_size, det_size), max_num=0)

    shared = sorted(p for p in DATA.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    phones = phone_photos.make_phone_photos(tmp_path, 8, DATA)
    sources = phone_photos.shared_photos(DATA)
    person = {path: path.parent.name for path in shared}
    person.update({path: sources[i].parent.name for i, path in enumerate(phones)})
    gained = {}
    for path in shared + phones:
        photo = sort_faces.PhotoPixels(str(path))
        seen = photo.at(sort_faces.detect_factor(photo, 640))
        passes = Recorded(app.det_model)
        boxes, kps = sort_faces.detect_faces(passes, seen, 640)
        first, first_kps = passes.results[0]  # its first pass, as it was before
        if np.array_equal(boxes, first) and np.array_equal(kps.ravel(), first_kps.ravel()):
            continue  # the same detections: embed_photo makes the same faces of them
        before = sort_faces.embed_photo(app, photo, 640, 512, detect=first_pass)
        now = sort_faces.embed_photo(app, sort_faces.PhotoPixels(str(path)), 640, 512)
        if len(before["bbox"]):
            assert len(now["bbox"]) == len(before["bbox"]), path
            iou = sort_faces.box_iou(before["bbox"], now["bbox"])
            match = iou.argmax(axis=1)
            assert len(set(match)) == len(match) and iou.max(axis=1).min() >= 0.98, path
            cosine = (before["embeddings"] * now["embeddings"][match]).sum(axis=1)
            assert cosine.min() >= 0.99, (path, cosine)
        else:
            long_side = max(photo.width, photo.height)
            assert len(now["bbox"]) == 1 and sort_faces.face_spans(
                now["bbox"], long_side, 640)[0] >= SECOND["min_face_px"], path
            gained[path] = now["embeddings"][0]
    assert [p.relative_to(DATA) for p in gained if p in shared] == \
        [Path("five_celebs/ben_affleck/val_2.jpg")]

    def centroid(folder: Path) -> np.ndarray:
        """The mean face of the first photos of a person (one face each)."""
        faces = [sort_faces.embed_photo(app, sort_faces.PhotoPixels(str(p)), 640, 512)
                 for p in sorted(folder.glob("*.jpg"))[:6]]
        return np.mean([f["embeddings"][0] for f in faces if len(f["embeddings"]) == 1], axis=0)

    folders = {p.parent for p in shared if p.parent.parent.name == "five_celebs"}
    centroids = {folder.name: centroid(folder) for folder in folders}
    for path, embedding in gained.items():  # the person the photo shows
        nearest = max(centroids, key=lambda name: float(centroids[name] @ embedding))
        assert nearest == person[path], (path, nearest)


def test_a_video_whose_face_zooms_to_fill_the_frame_has_a_face_in_every_sample(tmp_path,
                                                                                pack_dir):
    """A face zooming from 40% to 100% of a 720 px square frame, 8 s at 5 fps:
    a face in every sample, one a second."""
    photo = subjects()[0]
    image = cv2.imread(str(photo))
    app = sort_faces.load_face_analysis(str(pack_dir), ["detection"], ["CPUExecutionProvider"],
                                        640)
    boxes, _kps = app.det_model.detect(image, input_size=(640, 640))
    box = boxes[np.argmax((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))]
    src = tmp_path / "src"
    src.mkdir()
    frames = [around(image, box, 0.4 + 0.6 * i / 39, 720) for i in range(40)]
    videos.write_frames(src / "zoom.mp4", frames, [i / 5 for i in range(40)])
    summary = embed_quiet(src, tmp_path / "c.npz")
    cache = sort_faces.load_cache(tmp_path / "c.npz")
    frames = np.flatnonzero(cache["file_video"] != "")
    assert summary["frames"] == len(frames) == 8
    faces_in = np.bincount(cache["face_file"], minlength=cache.n_files)[frames]
    assert (faces_in == 1).all(), dict(zip(cache["file_time"][frames], faces_in))
