"""export-swap --for: the files of FaceFusion, VisoMaster, Rope, ReActor and
Deep-Live-Cam (issue 32), each read back by a reader written here from the
tool's own loader (quoted, with the commit read), and its numbers compared with
embeddings made here from the crops, as the tool makes them.

Offline, InsightFace's w600k_r50 cannot be downloaded: the tests whose names
say `stand_in` make the embedding files with buffalo_s's w600k_mbf standing in
for it (export_swap's `stand_in_recognizer`, which skips the checksum). They
check the formats and the way each tool computes its embeddings, not w600k_r50
itself."""

import argparse
import json
import os
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest

import sort_faces
from conftest import DATA, EXPORT, NAMED_FACESET, one_line_error, run_cli

# The arcface template every tool aligns to (insightface's face_align.arcface_dst;
# VisoMaster's and Rope's models_processor.arcface_dst / Models.arcface_dst: the same).
ARCFACE_DST = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                        [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float32)


# --- readers, written from each tool's loader --------------------------------------


def visomaster_read(path: Path) -> list[tuple[str, dict]]:
    """visomaster/VisoMaster 429cc08, app/ui/widgets/actions/save_load_actions.py:

        with open(embedding_filename, 'r') as embed_file:
            embeddings_list = json.load(embed_file)
            ...
            for embed_data in embeddings_list:
                embedding_store = embed_data.get('embedding_store', {})
                for recogn_model, embed in embedding_store.items():
                    embedding_store[recogn_model] = np.array(embed)
                list_view_actions.create_and_add_embed_button_to_list(
                    main_window, embed_data['name'], embedding_store, ...)

    (opened in the platform's encoding: read here as ASCII, the strictest one)."""
    with open(path, "r", encoding="ascii") as embed_file:
        embeddings_list = json.load(embed_file)
    read = []
    for embed_data in embeddings_list:
        embedding_store = embed_data.get("embedding_store", {})
        for recogn_model, embed in embedding_store.items():
            embedding_store[recogn_model] = np.array(embed)
        read.append((embed_data["name"], embedding_store))
    return read


def rope_read(path: Path) -> list[tuple[str, np.ndarray]]:
    """Hillobar/Rope 3fb328e, rope/GUI.py load_input_faces:

        with open("merged_embeddings.txt", "r") as embedfile:
            temp = embedfile.read().splitlines()
            for i in range(0, len(temp), 513):
                to = [temp[i][6:], np.array(temp[i+1:i+513], dtype='float32')]
                temp0.append(to)

    (in the platform's encoding: read here as ASCII)."""
    with open(path, "r", encoding="ascii") as embedfile:
        temp = embedfile.read().splitlines()
    return [(temp[i][6:], np.array(temp[i + 1:i + 513], dtype="float32"))
            for i in range(0, len(temp), 513)]


def rope_write(path: Path, name: str, embedding) -> None:
    """Rope's own writer of a record (rope/GUI.py save_selected_source_faces):

        with open("merged_embeddings.txt", "a") as embedfile:
            identifier = "Name: "+text
            embedfile.write("%s\\n" % identifier)
            for number in ave_embedding:
                embedfile.write("%s\\n" % number)
    """
    with open(path, "a") as embedfile:
        embedfile.write("%s\n" % ("Name: " + name))
        for number in embedding:
            embedfile.write("%s\n" % number)


def reactor_read(path: Path):
    """Gourieff/comfyui-reactor-node 3ea587d, reactor_utils.py load_face_model:

        face = {}
        with safe_open(filename, framework="pt") as f:
            for k in f.keys():
                face[k] = f.get_tensor(k).numpy()
        return Face(face)

    with the safetensors package's numpy framework in place of torch's (not
    installed here: the file's bytes are the same either way)."""
    from insightface.app.common import Face
    from safetensors import safe_open

    face = {}
    with safe_open(str(path), framework="np") as f:
        for k in f.keys():
            face[k] = f.get_tensor(k)
    return Face(face)


def facefusion_source_paths(script: Path, tmp_path: Path) -> list[str]:
    """The -s/--source-paths FaceFusion gets from the script: run as a user runs
    it (in FaceFusion's folder, here an empty one) with a `python` that prints
    its arguments, parsed by FaceFusion's own arguments (facefusion/facefusion
    33cc6b4, program.py: `-s/--source-paths ... nargs='+'`, `-t/--target-path`,
    `-o/--output-path` under the `headless-run` command) and kept as
    filesystem.py filter_image_paths keeps them: `is_image`, a file whose
    get_file_format is one of choices.image_formats."""
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    (fake / "python").write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done\n')
    (fake / "python").chmod(0o755)
    facefusion = tmp_path / "facefusion"
    facefusion.mkdir(exist_ok=True)
    result = subprocess.run(["sh", str(script), "headless-run", "-t", "target.mp4", "-o",
                             "out.mp4"], cwd=facefusion, capture_output=True, text=True,
                            env=dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}"))
    assert result.returncode == 0, result.stderr
    argv = result.stdout.splitlines()
    assert argv[0] == "facefusion.py"
    program = argparse.ArgumentParser()
    commands = program.add_subparsers(dest="command")
    run = commands.add_parser("headless-run")
    run.add_argument("-s", "--source-paths", nargs="+")
    run.add_argument("-t", "--target-path")
    run.add_argument("-o", "--output-path")
    args = program.parse_args(argv[1:])
    assert (args.command, args.target_path, args.output_path) == \
        ("headless-run", "target.mp4", "out.mp4")

    def get_file_format(file_path):  # filesystem.py
        extension = os.path.splitext(file_path)[1].lower()
        return {".jpg": "jpeg", ".tif": "tiff"}.get(extension, extension.lstrip("."))

    image_formats = ["bmp", "jpeg", "png", "tiff", "webp"]  # types.py ImageFormat
    return [path for path in args.source_paths
            if os.path.isfile(path) and get_file_format(path) in image_formats]


# --- the embeddings, made here as each tool makes them ------------------------------


def similarity(kps, dst) -> np.ndarray:
    """skimage's SimilarityTransform from the key points to `dst`, as 3x3."""
    from skimage import transform

    tform = transform.SimilarityTransform()
    with warnings.catch_warnings():  # skimage's FutureWarning: as they call it, still
        warnings.simplefilter("ignore")
        tform.estimate(np.asarray(kps, np.float32), dst)  # the detector's float32, as passed
    return tform.params


def torchvision_affine_nearest(image: np.ndarray, params: np.ndarray, side: int) -> np.ndarray:
    """torchvision's v2.functional.affine(img, angle, translate, scale, 0,
    center=(0, 0)) of `params` (InterpolationMode.NEAREST, its default; fill 0),
    cropped to the top-left side x side, as VisoMaster's and Rope's recognize
    call it; from its grid: output pixel (x, y) reads the input at
    inverse((x + 0.5, y + 0.5)) - 0.5, the nearest pixel, zero outside."""
    inverse = np.linalg.inv(params)
    ys, xs = np.mgrid[0:side, 0:side].astype(np.float64)
    points = np.stack([xs + 0.5, ys + 0.5, np.ones_like(xs)], axis=-1) @ inverse.T
    sx, sy = np.rint(points[..., 0] - 0.5).astype(int), np.rint(points[..., 1] - 0.5).astype(int)
    inside = (sx >= 0) & (sy >= 0) & (sx < image.shape[1]) & (sy < image.shape[0])
    out = np.zeros((side, side, 3), np.uint8)
    out[inside] = image[sy[inside], sx[inside]]
    return out


def rope_pad(image: np.ndarray) -> np.ndarray:
    """rope/GUI.py load_input_faces: pad_scale = 0.2; padded_width =
    int(img.size()[1]*(1.+pad_scale)); width_start = int(img.size()[1]*pad_scale/2)."""
    pad_scale = 0.2
    height, width = image.shape[:2]
    padding = np.zeros((int(height * (1. + pad_scale)), int(width * (1. + pad_scale)), 3),
                       np.uint8)
    width_start, height_start = int(width * pad_scale / 2), int(height * pad_scale / 2)
    padding[height_start:height_start + height, width_start:width_start + width] = image
    return padding


def only_face(detector, image, size):
    """The one face's key points the detector finds at `size` (the crop holds one)."""
    boxes, kpss = detector.det_model.detect(image, input_size=(size, size))
    assert len(boxes) == 1, len(boxes)
    return kpss[0]


def run_recognizer(session, faces_rgb: list[np.ndarray]) -> np.ndarray:
    """(x - 127.5) / 127.5 of RGB faces, NCHW, through the recognizer: raw output."""
    blob = np.stack([(f.astype(np.float32) - 127.5) / 127.5 for f in faces_rgb])
    return session.run(None, {session.get_inputs()[0].name: blob.transpose(0, 3, 1, 2)})[0]


def visomaster_embedding(image_bgr, detector, session) -> np.ndarray:
    """InputFacesLoaderWorker.load_faces: frame[..., ::-1] (RGB), run_detect at
    input_size (512, 512); FaceSwappers.recognize, similarity "Opal": the
    transform to arcface_dst, v2.functional.affine, crop 112, then
    torch.sub(img, 127.5), torch.div(img, 127.5)."""
    rgb = image_bgr[..., ::-1]
    kps = only_face(detector, image_bgr, 512)
    face = torchvision_affine_nearest(rgb, similarity(kps, ARCFACE_DST), 112)
    return run_recognizer(session, [face])[0]


def rope_embedding(image_bgr, detector, session) -> np.ndarray:
    """load_input_faces pads the image (BGR, as cv2.imread gives it) and
    detects at 640; Models.recognize: dst[:, 0] += 8.0, v2.functional.affine,
    crop 128, v2.Resize((112, 112), BILINEAR, antialias=False), then
    img[:, :, [2,1,0]] (RGB) and (x - 127.5) / 127.5."""
    padded = rope_pad(image_bgr)
    kps = only_face(detector, padded, 640)
    dst = ARCFACE_DST.copy()
    dst[:, 0] += 8.0
    face = torchvision_affine_nearest(padded, similarity(kps, dst), 128)
    face = np.rint(cv2.resize(face.astype(np.float32), (112, 112),
                              interpolation=cv2.INTER_LINEAR)).clip(0, 255).astype(np.uint8)
    return run_recognizer(session, [face[:, :, [2, 1, 0]]])[0]


def reactor_embedding(image_bgr, detector, session) -> np.ndarray:
    """ReActor's analyze_faces: insightface's FaceAnalysis at det 640, whose
    ArcFaceONNX.get embeds face_align.norm_crop(img, landmark=face.kps) with
    blobFromImages(1/127.5, mean 127.5, swapRB=True)."""
    from insightface.utils import face_align

    kps = only_face(detector, image_bgr, 640)
    with warnings.catch_warnings():  # skimage's FutureWarning of insightface's estimate
        warnings.simplefilter("ignore")
        face = face_align.norm_crop(image_bgr, landmark=kps, image_size=112)
    return run_recognizer(session, [face[..., ::-1]])[0]


# --- fast tier: the writers, read back ---------------------------------------------


def unit_vector(seed: int) -> np.ndarray:
    vector = np.random.default_rng(seed).normal(size=512).astype(np.float32)
    return vector * np.float32(21.7 / np.linalg.norm(vector))  # a raw embedding's size


@pytest.mark.fast
def test_for_reads_tool_names_in_order_all_and_refuses_others():
    assert sort_faces.swap_tools("facefusion, roop") == ("roop", "facefusion")
    assert sort_faces.swap_tools("all") == sort_faces.SWAP_TOOLS
    assert sort_faces.swap_tools(["reactor", "rope", "reactor"]) == ("rope", "reactor")
    for wrong in ("roop,faceswap", "", ","):
        with pytest.raises(sort_faces.UserError, match="--for: .*name one or more of roop,"):
            sort_faces.swap_tools(wrong)


@pytest.mark.fast
def test_rope_records_append_to_a_users_merged_embeddings(tmp_path):
    mine, ours = unit_vector(1), unit_vector(2)
    merged = tmp_path / "merged_embeddings.txt"
    rope_write(merged, "my own", mine)  # a user's file, as Rope writes it
    name = sort_faces.rope_name("faceset_002 Mindy Kaling – Véra")
    assert name == "faceset_002 Mindy Kaling Vera"
    text = sort_faces.rope_records_text(name, ours)
    with open(merged, "a") as handle:  # `cat X_rope.txt >> merged_embeddings.txt`
        handle.write(text)
    (first, first_vector), (second, second_vector) = rope_read(merged)
    assert first == "my own" and np.array_equal(first_vector, mine)
    assert second == name and second_vector.dtype == np.float32
    assert np.array_equal(second_vector, ours)  # "%s" of a float32 reads back exactly
    rope_write(tmp_path / "by_rope.txt", name, ours)  # byte for byte what Rope writes
    assert (tmp_path / "by_rope.txt").read_text() == text


@pytest.mark.fast
def test_visomaster_embeddings_file_reads_back(tmp_path):
    embedding = unit_vector(3)
    path = tmp_path / "x_visomaster.json"
    path.write_text(sort_faces.visomaster_embeddings_text(NAMED_FACESET[1], embedding))
    [(name, store)] = visomaster_read(path)
    assert name == NAMED_FACESET[1] and list(store) == ["Inswapper128ArcFace"]
    assert store["Inswapper128ArcFace"].shape == (512,)
    assert np.array_equal(store["Inswapper128ArcFace"].astype(np.float32), embedding)


@pytest.mark.fast
def test_reactor_face_model_reads_back_with_safetensors_and_insightface(tmp_path):
    from safetensors.numpy import load_file

    fields = {"bbox": np.array([1.5, 2, 30, 40], np.float32),
              "kps": np.arange(10, dtype=np.float32).reshape(5, 2),
              "det_score": np.float32(0.87),
              "landmark_2d_106": np.ones((106, 2), np.float32),
              "gender": np.int64(1), "age": 41}
    embedding = unit_vector(4)
    model = sort_faces.reactor_face_model(fields, embedding)
    path = tmp_path / "faceset_002.safetensors"
    path.write_bytes(sort_faces.safetensors_bytes(model, {"format": "pt", "name": "é"}))
    arrays = load_file(str(path))  # the package's own reader
    assert set(arrays) == {"bbox", "kps", "det_score", "landmark_2d_106", "embedding", "gender",
                           "age"}  # landmark_3d_68 and pose: no model gave them
    assert arrays["det_score"].shape == () and arrays["det_score"].dtype == np.float32
    assert arrays["gender"].dtype == np.int64 and int(arrays["age"]) == 41
    assert np.array_equal(arrays["embedding"], embedding) and arrays["kps"].shape == (5, 2)
    face = reactor_read(path)
    assert face.sex == "M" and face.landmark_3d_68 is None
    assert np.allclose(face.normed_embedding, embedding / np.linalg.norm(embedding))
    header = json.loads(path.read_bytes()[8:8 + int.from_bytes(path.read_bytes()[:8], "little")])
    assert header["__metadata__"] == {"format": "pt", "name": "é"}


@pytest.mark.fast
def test_facefusion_scripts_pass_exactly_the_crops(tmp_path):
    out = tmp_path / "out"
    folder = "faceset_003_O'Brien 100% $x"  # quotes, %, $ and a space survive both shells
    (out / folder).mkdir(parents=True)
    pngs = [f"{folder}/{i:04d}.png" for i in range(3)]
    for png in pngs:
        (out / png).write_bytes(b"\x89PNG")
    texts = sort_faces.facefusion_texts("faceset_003 O'Brien 100% $x", out, pngs)
    for suffix, text in texts.items():
        (out / ("faceset_003" + suffix)).write_bytes(text.encode("utf-8"))
    wanted = [str(out / png) for png in pngs]
    assert facefusion_source_paths(out / "faceset_003_facefusion.sh", tmp_path) == wanted
    assert (out / "faceset_003_facefusion.txt").read_text().splitlines() == wanted
    cmd = texts["_facefusion.cmd"]
    assert cmd.endswith("\r\n") and "\n" not in cmd.replace("\r\n", "")
    assert "python facefusion.py %* --source-paths ^" in cmd
    assert [line.strip(" ^") for line in cmd.split("\r\n") if "%~dp0" in line] == [
        f'"%~dp0{png}"'.replace("/", "\\").replace("100%", "100%%") for png in pngs]


@pytest.mark.fast
def test_manifest_swap_fields_read_back_and_are_checked(tmp_path):
    """The fields --for added: a manifest of before reads as roop's alone; one
    with them reads back as written; a file or a tool that is not of the tool's
    own form is one line naming it."""
    from conftest import ROOT

    data = json.loads((ROOT / "tests" / "data" / "manifests_v1" / "export_manifest.json")
                      .read_text("utf-8"))
    old = sort_faces.parse_manifest(data, "export-swap", tmp_path / "m.json")
    assert old.tools is None and old.tools_asked == ["roop"] and old.refused is None
    entry = data["facesets"][0]
    folder = sort_faces.entry_folder(entry["name"], entry.get("label"))
    pngs = [c["png"] for c in entry["crops"]][:2]
    entry["swap_files"] = [{"tool": "rope", "file": folder + "_rope.txt", "crops": pngs,
                            "bytes": 100}]
    data.update(tools=["roop", "rope"], refused=[{"tool": "visomaster", "reason": "no model"}],
                recognizer={"file": "/m/w600k_r50.onnx", "sha256": "0" * 64, "check": "sha256"})
    new = sort_faces.parse_manifest(data, "export-swap", tmp_path / "m.json")
    assert new.to_json() == data and new.facesets[0].swap_files[0].crops == pngs
    for change, words in (
            (lambda d: d["facesets"][0]["swap_files"][0].update(file="faceset_999_rope.txt"),
             "facesets[0].swap_files[0].file: 'faceset_999_rope.txt' is not a rope file of"),
            (lambda d: d["facesets"][0]["swap_files"][0].update(tool="roop"),
             "facesets[0].swap_files[0].tool: 'roop' is not one of"),
            (lambda d: d["facesets"][0]["swap_files"][0].update(crops=["9999.png"]),
             "names a PNG the faceset's crops do not"),
            (lambda d: d.update(tools=["roop", "faceswap"]), "tools: 'faceswap' is not one of")):
        changed = json.loads(json.dumps(data))
        change(changed)
        with pytest.raises(sort_faces.UserError, match=re.escape(words)):
            sort_faces.parse_manifest(changed, "export-swap", tmp_path / "m.json")


# --- the exports: a small one with a named faceset, re-used by every test ----------


@pytest.fixture(scope="module")
def detector(pack_dir):
    return sort_faces.load_face_analysis(str(pack_dir), ["detection"],
                                         ["CPUExecutionProvider"], 640)


@pytest.fixture(scope="module")
def two_facesets(labeled_export, tmp_path_factory):
    """labeled_export's refine manifest cut to two facesets, the named one and
    the smallest other (`refined`), and to that other alone (`one`), for small
    exports of the same enriched cache."""
    tmp = tmp_path_factory.mktemp("swappers")
    refined = labeled_export["refined"]
    named = [s for s in refined["facesets"] if s["name"] == NAMED_FACESET[0]]
    smallest = min((s for s in refined["facesets"] if s["name"] != NAMED_FACESET[0]),
                   key=lambda s: (s["size"], s["name"]))
    paths = {}
    for key, facesets in (("refined", named + [smallest]), ("one", [smallest])):
        paths[key] = tmp / key / "refine_manifest.json"
        paths[key].parent.mkdir()
        paths[key].write_text(json.dumps(dict(refined, facesets=facesets)))
    return {"cache": labeled_export["cache"], "tmp": tmp, **paths}


@pytest.fixture(scope="module")
def stand_in_export(two_facesets, pack_dir):
    """export-swap --for all, buffalo_s's w600k_mbf standing in for w600k_r50:
    it is the cache's own recognizer, so VisoMaster's and ReActor's means are of
    the cache's embeddings, and Rope's of the crops (its shifted crop)."""
    out = two_facesets["tmp"] / "all"
    manifest = sort_faces.export_swap(two_facesets["cache"], two_facesets["refined"], out,
                                      tools="all", stand_in_recognizer=pack_dir / "w600k_mbf.onnx",
                                      quiet=True, **EXPORT)
    return {"out": out, "manifest": manifest}


def swap_files(entry: dict, tool: str) -> list[dict]:
    return [f for f in entry["swap_files"] if f["tool"] == tool]


def crops_of(out: Path, entry: dict, pngs: list[str]) -> list[np.ndarray]:
    folder = sort_faces.entry_folder(entry["name"], entry.get("label"))
    return [cv2.imread(str(out / folder / png)) for png in pngs]


def raw_embeddings(cache, faces) -> np.ndarray:
    return cache["embeddings"][faces] * cache["embedding_norm"][faces][:, None]


def test_stand_in_every_tools_files_are_named_listed_and_read_back(stand_in_export, detector,
                                                                   pack_dir, tmp_path):
    """Stand-in recognizer (w600k_mbf for w600k_r50). Each tool's file of each
    faceset, named after its folder, read back by the tool's loader: the names,
    512 numbers, and the values of the top crops' embeddings."""
    import onnxruntime

    out, manifest = stand_in_export["out"], stand_in_export["manifest"]
    assert manifest["tools"] == list(sort_faces.SWAP_TOOLS) and manifest["refused"] == []
    recognizer = manifest["recognizer"]
    assert recognizer["check"] == "stand-in" and recognizer["embeddings"] == {
        "visomaster": "cache", "rope": "crops", "reactor": "cache"}
    assert sort_faces.load_manifest(out / "export_manifest.json", "export-swap").to_json() == \
        json.loads((out / "export_manifest.json").read_text("utf-8"))
    cache = sort_faces.load_cache(Path(manifest["cache"]))
    session = onnxruntime.InferenceSession(str(pack_dir / "w600k_mbf.onnx"),
                                           providers=["CPUExecutionProvider"])
    listed = {"export_manifest.json", "index.html", "_thumbs", ".face-sets-output.json"}
    named = manifest["facesets"][0]
    assert (named["name"], named["label"]) == NAMED_FACESET and len(manifest["facesets"]) == 2
    assert all(f["file"].startswith(f"{NAMED_FACESET[0]}_{NAMED_FACESET[1]}")
               for f in named["swap_files"])
    for entry in manifest["facesets"]:
        folder = sort_faces.entry_folder(entry["name"], entry.get("label"))
        title = sort_faces.entry_title(entry["name"], entry.get("label"))
        top = [c for c in entry["crops"] if c["in_top"]]
        assert 0 < len(top) <= EXPORT["top_n"]
        files = {f["file"]: f for f in entry["swap_files"]}
        assert sorted(files) == sorted(f for tool in sort_faces.SWAP_TOOLS[1:]
                                       for f in sort_faces.entry_swap_files(
                                           entry["name"], entry.get("label"), tool))
        for file in files.values():
            assert (out / file["file"]).stat().st_size == file["bytes"]
            assert file["file"].startswith(folder)
        listed |= {folder, *files, *(b["file"] for b in entry["bundles"])}
        top_pngs = [c["png"] for c in top]
        faces = [c["face"] for c in top]
        # VisoMaster: the cache's raw embeddings, averaged
        [viso] = swap_files(entry, "visomaster")
        [(name, store)] = visomaster_read(out / viso["file"])
        assert name == title and viso["crops"] == top_pngs
        assert np.allclose(store["Inswapper128ArcFace"],
                           raw_embeddings(cache, faces).mean(axis=0), rtol=1e-5, atol=1e-5)
        # Rope: made from the crops, padded and shifted as Rope does
        [rope] = swap_files(entry, "rope")
        [(name, vector)] = rope_read(out / rope["file"])
        assert name == sort_faces.rope_name(title) and name.isascii() and rope["crops"] == top_pngs
        expected = np.mean([rope_embedding(image, detector, session)
                            for image in crops_of(out, entry, rope["crops"])], axis=0)
        # (a pixel of the nearest-pixel warp may round the other way: cv2's fixed point)
        assert vector.shape == (512,) and np.allclose(vector, expected, rtol=1e-3, atol=1e-3)
        assert float(vector @ expected) / np.linalg.norm(vector) / np.linalg.norm(expected) > 0.9999
        # ReActor: the blended face model of the best crop's fields
        [reactor] = swap_files(entry, "reactor")
        face = reactor_read(out / reactor["file"])
        assert reactor["file"] == folder + ".safetensors"
        assert np.allclose(face.embedding, raw_embeddings(cache, faces).mean(axis=0), rtol=1e-5,
                           atol=1e-5)
        best = crops_of(out, entry, top_pngs[:1])[0]
        [found] = detector.get(best)
        assert np.allclose(face.bbox, found.bbox, atol=1e-3) and face.kps.shape == (5, 2)
        assert face.landmark_2d_106.shape == (106, 2) and face.gender is None  # buffalo_s has none
        # FaceFusion: the top crops, as files it takes
        ff = {Path(f["file"]).suffix: f for f in swap_files(entry, "facefusion")}
        assert sorted(ff) == [".cmd", ".sh", ".txt"]
        wanted = [str(out / folder / png) for png in top_pngs]
        assert facefusion_source_paths(out / ff[".sh"]["file"], tmp_path) == wanted
        assert os.access(out / ff[".sh"]["file"], os.X_OK)
        assert (out / ff[".txt"]["file"]).read_text("utf-8").splitlines() == wanted
        # Deep-Live-Cam: the best crop, one face at its det 640
        [dlc] = swap_files(entry, "deeplivecam")
        assert (out / dlc["file"]).read_bytes() == (out / folder / top_pngs[0]).read_bytes()
        assert dlc["crops"] == top_pngs[:1]
        # modules/face_analyser.py get_one_face: min(faces, key=lambda x: x.bbox[0]), at 640
        faces = detector.get(cv2.imread(str(out / dlc["file"])))
        assert len(faces) == 1 and np.allclose(min(faces, key=lambda x: x.bbox[0]).bbox,
                                               face.bbox, atol=1e-3)
    assert set(os.listdir(out)) == listed


def test_stand_in_crops_are_one_face_at_visomaster_and_rope_detection(stand_in_export, detector):
    """Stand-in export's crops (the recognizer plays no part here): every one is
    detected as exactly one face as VisoMaster's folder loader shows it (as it
    is, det 512) and as Rope's does (padded by 20%, det 640)."""
    out, manifest = stand_in_export["out"], stand_in_export["manifest"]
    crops = 0
    for entry in manifest["facesets"]:
        for image in crops_of(out, entry, [c["png"] for c in entry["crops"]]):
            assert len(detector.det_model.detect(image, input_size=(512, 512))[0]) == 1
            assert len(detector.det_model.detect(rope_pad(image), input_size=(640, 640))[0]) == 1
            crops += 1
    assert crops >= 4


def test_stand_in_embeddings_made_from_the_crops_and_a_re_export_drops_other_tools(
        stand_in_export, two_facesets, pack_dir, detector, tmp_path):
    """Stand-in recognizer that is not the cache's (w600k_mbf with another doc
    string: other bytes, the same numbers): VisoMaster's and ReActor's means
    are made from the crops as each tool makes them. Re-exported (one faceset)
    over the --for all output: only those two tools' files are left, of it."""
    import onnx
    import onnxruntime

    stand_in = tmp_path / "w600k_mbf_copy.onnx"
    model = onnx.load(str(pack_dir / "w600k_mbf.onnx"))
    model.doc_string = "a stand-in for w600k_r50 (tests)"
    onnx.save(model, str(stand_in))
    out = tmp_path / "again"
    shutil.copytree(stand_in_export["out"], out)
    manifest = sort_faces.export_swap(two_facesets["cache"], two_facesets["one"], out,
                                      tools="visomaster,reactor", stand_in_recognizer=stand_in,
                                      quiet=True, **EXPORT)
    assert manifest["tools"] == ["visomaster", "reactor"]
    assert manifest["recognizer"]["embeddings"] == {"visomaster": "crops", "reactor": "crops"}
    session = onnxruntime.InferenceSession(str(stand_in), providers=["CPUExecutionProvider"])
    for entry in manifest["facesets"]:
        assert entry["bundles"] == [] and {f["tool"] for f in entry["swap_files"]} == \
            {"visomaster", "reactor"}
        [viso] = swap_files(entry, "visomaster")
        [(_name, store)] = visomaster_read(out / viso["file"])
        expected = np.mean([visomaster_embedding(image, detector, session)
                            for image in crops_of(out, entry, viso["crops"])], axis=0)
        got = store["Inswapper128ArcFace"]
        assert np.allclose(got, expected, rtol=1e-3, atol=1e-3)  # (as Rope's, above)
        assert float(got @ expected) / np.linalg.norm(got) / np.linalg.norm(expected) > 0.9999
        [reactor] = swap_files(entry, "reactor")
        expected = np.mean([reactor_embedding(image, detector, session)
                            for image in crops_of(out, entry, reactor["crops"])], axis=0)
        assert np.allclose(reactor_read(out / reactor["file"]).embedding, expected, rtol=1e-5,
                           atol=1e-5)
    names = os.listdir(out)
    assert not [n for n in names if n.endswith((".fsz", "_rope.txt", "_deeplivecam.png",
                                                "_facefusion.sh", "_facefusion.cmd",
                                                "_facefusion.txt"))], names
    assert [n for n in names if n.endswith("_visomaster.json")] == [
        manifest["facesets"][0]["name"] + "_visomaster.json"]


def test_without_w600k_r50_the_embedding_tools_are_refused_and_the_rest_written(
        two_facesets, tmp_path):
    """No w600k_r50 anywhere (an empty --model-root; the cache is buffalo_s's):
    VisoMaster, Rope and ReActor are refused in one line that says where to get
    it and where to put it, listed in the manifest; FaceFusion's, Deep-Live-Cam's
    and roop's files are written; the run exits 1."""
    out, root = tmp_path / "swap", tmp_path / "no-models"
    code, _out, err = run_cli("export-swap", two_facesets["cache"], two_facesets["one"], out,
                              "--for", "all", "--model-root", root, "--quiet",
                              *[f"--{k.replace('_', '-')}={v}" for k, v in EXPORT.items()])
    assert code == 1, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    wanted = str(root / "models" / "buffalo_l" / "w600k_r50.onnx")
    for words in ("visomaster, rope, reactor not written", "w600k_r50", "buffalo_l.zip",
                  wanted, "--swap-recognizer"):
        assert words in lines[0], (words, lines[0])
    manifest = json.loads((out / "export_manifest.json").read_text("utf-8"))
    assert [r["tool"] for r in manifest["refused"]] == ["visomaster", "rope", "reactor"]
    assert "recognizer" not in manifest
    for entry in manifest["facesets"]:
        assert {f["tool"] for f in entry["swap_files"]} == {"facefusion", "deeplivecam"}
        assert len(entry["bundles"]) == 2
        for file in entry["swap_files"]:
            assert (out / file["file"]).is_file()
    assert not [n for n in os.listdir(out)
                if n.endswith(("_visomaster.json", "_rope.txt", ".safetensors"))]
    assert "not written" in (out / "index.html").read_text("utf-8")


def test_the_recognizer_is_looked_for_in_the_buffalo_l_pack_and_checked_there(pack_dir,
                                                                             tmp_path):
    """Without --swap-recognizer, <model-root>/models/buffalo_l/w600k_r50.onnx is
    the one used; a file there that is not w600k_r50 (here w600k_mbf under its
    name) is refused by its checksum, in the one line that names it. The cache's
    own pack is not looked in unless it was made with w600k_r50."""
    from types import SimpleNamespace

    buffalo_s_cache = SimpleNamespace(meta={"model": {"pack": "buffalo_s",
                                                      "recognition_sha256": "0" * 64}})
    root = tmp_path / "root"
    found = sort_faces.find_swap_recognizer(buffalo_s_cache, pack_dir, str(root))
    assert isinstance(found, str) and str(root / "models" / "buffalo_l" / "w600k_r50.onnx") in found
    home = root / "models" / "buffalo_l"
    home.mkdir(parents=True)
    shutil.copy2(pack_dir / "w600k_mbf.onnx", home / "w600k_r50.onnx")
    found = sort_faces.find_swap_recognizer(buffalo_s_cache, pack_dir, str(root))
    assert isinstance(found, str) and f"{home / 'w600k_r50.onnx'} is not InsightFace's" in found
    assert "sha256" in found and "--swap-recognizer" in found


def test_a_swap_recognizer_that_is_not_w600k_r50_is_one_line_and_nothing_is_written(
        two_facesets, pack_dir, tmp_path):
    """--swap-recognizer must be w600k_r50: w600k_mbf has its shapes but not its
    checksum; a photo is no ONNX model at all. Refused before anything is made."""
    out = tmp_path / "swap"
    code, _out, err = run_cli("export-swap", two_facesets["cache"], two_facesets["one"], out,
                              "--for", "visomaster", "--swap-recognizer",
                              pack_dir / "w600k_mbf.onnx")
    one_line_error(code, err, "--swap-recognizer", "is not InsightFace's w600k_r50.onnx",
                   "sha256", sort_faces.SWAP_RECOGNIZER_SHA256[0])
    assert not out.exists()
    photo = DATA / "face_recognition" / "barack_obama" / "obama1.jpg"
    with pytest.raises(sort_faces.UserError, match="--swap-recognizer .* is not an ONNX model"):
        sort_faces.export_swap(two_facesets["cache"], two_facesets["one"], out,
                               tools="rope", swap_recognizer=photo, quiet=True, **EXPORT)
    assert not out.exists()
