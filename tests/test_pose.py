"""Head pose, landmark symmetry and frontality: synthetic projections with
known angles, then the real buffalo_s 2d106 model on real photos."""

import math
import os

import cv2
import numpy as np
import pytest

import sort_faces as ps
from conftest import DATA

pytestmark = pytest.mark.fast  # no model: the quick tier

FACES = str(DATA)

FRONTAL = [
    "face_recognition/barack_obama/obama.jpg",
    "face_recognition/alex_lacamoire/alex_train1.jpg",
    "face_recognition/joe_biden/biden2.jpg",
    "face_recognition/rose_leslie/rose1.jpg",
]
# Faces turned towards the image's left (subject's right): yaw < 0.
TURNED_IMAGE_LEFT = [
    "face_recognition/barack_obama/obama2.jpg",
    "face_recognition/kit_harington/john2.jpeg",
    "five_celebs/ben_affleck/train_5.jpg",
]
# Faces turned towards the image's right (subject's left): yaw > 0.
TURNED_IMAGE_RIGHT = [
    "face_recognition/barack_obama/obama1.jpg",
    "face_recognition/kit_harington/johnsnow_test1.jpg",
]
LOOKING_UP = ["face_recognition/barack_obama/obama3.jpg"]
LOOKING_DOWN = ["five_celebs/ben_affleck/train_1.jpg"]


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def _rot_x(a):
    c, s = math.cos(a), math.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]], dtype=np.float64)


def _rot_y(a):
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]], dtype=np.float64)


def _rot_z(a):
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]], dtype=np.float64)


def _rotation(pitch, yaw, roll):
    """Documented convention: R = Ry(-yaw) @ Rx(-pitch) @ Rz(roll)."""
    p, y, r = np.radians([pitch, yaw, roll])
    return _rot_y(-y) @ _rot_x(-p) @ _rot_z(r)


def _project(rot, tvec, width, height, model=ps.POSE_MODEL_POINTS_3D):
    focal = max(width, height)
    cam = model @ rot.T + tvec
    u = focal * cam[:, 0] / cam[:, 2] + width / 2.0
    v = focal * cam[:, 1] / cam[:, 2] + height / 2.0
    return np.stack([u, v], axis=1)


def _synthetic_landmarks(rot, tvec, width=640, height=480):
    lm = np.zeros((106, 2), dtype=np.float64)
    lm[:] = (width / 2.0, height / 2.0)
    lm[list(ps.POSE_LANDMARK_INDICES)] = _project(rot, tvec, width, height)
    return lm


def _symmetric_landmarks(seed=0):
    rng = np.random.default_rng(seed)
    lm = np.zeros((106, 2), dtype=np.float64)
    for i, j in ps.LANDMARK_MIRROR_PAIRS:
        x, y = rng.uniform(5, 60), rng.uniform(-60, 90)
        lm[i] = (-x, y)
        lm[j] = (x, y)
    for k in ps.LANDMARK_MIDLINE:
        lm[k] = (0.0, rng.uniform(-60, 90))
    for k in (34, 38):
        lm[k] = (-31.0, -35.0)
    for k in (88, 92):
        lm[k] = (31.0, -35.0)
    # eye corners must be apart for a valid inter-ocular distance
    lm[35], lm[93] = (-45.0, -35.0), (45.0, -35.0)
    lm[39], lm[89] = (-18.0, -34.0), (18.0, -34.0)
    return lm


def _similarity(lm, angle_deg, scale, shift):
    a = math.radians(angle_deg)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return lm @ rot.T * scale + np.asarray(shift, dtype=np.float64)


# ---------------------------------------------------------------------------
# pure tests (no model needed)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("pitch,yaw,roll", [
    (0, 0, 0), (0, 25, 0), (0, -25, 0), (15, 0, 0), (-15, 0, 0),
    (0, 0, 20), (0, 0, -20), (10, 30, -8), (-12, -35, 15),
])
def test_pose_recovers_synthetic_rotation(pitch, yaw, roll):
    rot = _rotation(pitch, yaw, roll)
    lm = _synthetic_landmarks(rot, np.array([0.0, 0.0, 600.0]))
    pose = ps.pose_from_landmarks_2d(lm, 640, 480)
    assert pose.shape == (3,) and pose.dtype == np.float32
    np.testing.assert_allclose(pose, [pitch, yaw, roll], atol=0.5)


def test_pose_sign_convention_in_image():
    # yaw > 0: nose tip moves to the image's right of the eye midpoint.
    lm = _synthetic_landmarks(_rotation(0, 30, 0), np.array([0.0, 0, 600]))
    eyes_mid = lm[[35, 39, 89, 93]].mean(axis=0)
    assert lm[86, 0] > eyes_mid[0] + 5
    # pitch > 0 (looking up): nose tip moves up towards the eyes.
    up = _synthetic_landmarks(_rotation(20, 0, 0), np.array([0.0, 0, 600]))
    flat = _synthetic_landmarks(_rotation(0, 0, 0), np.array([0.0, 0, 600]))
    assert (up[86, 1] - up[35, 1]) < (flat[86, 1] - flat[35, 1]) - 3
    # roll > 0: clockwise in the image, image-right eye lower than left.
    rl = _synthetic_landmarks(_rotation(0, 0, 15), np.array([0.0, 0, 600]))
    assert rl[93, 1] > rl[35, 1] + 5


def test_pose_relative_to_ray_for_off_centre_face():
    # Face near the right border, looking straight into the lens.
    tvec = np.array([250.0, 0.0, 600.0])
    ray = tvec / np.linalg.norm(tvec)
    axis = np.cross([0.0, 0.0, 1.0], ray)
    angle = math.atan2(np.linalg.norm(axis), ray[2])
    rot_ray, _ = cv2.Rodrigues(axis / np.linalg.norm(axis) * angle)
    lm = _synthetic_landmarks(rot_ray, tvec)
    rel = ps.pose_from_landmarks_2d(lm, 640, 480)
    cam = ps.pose_from_landmarks_2d(lm, 640, 480, relative_to_ray=False)
    np.testing.assert_allclose(rel, [0, 0, 0], atol=0.5)
    # Relative to the optical axis the same face (right of centre, facing
    # the lens) points back towards the image's left: yaw < 0.
    assert cam[1] == pytest.approx(-math.degrees(angle), abs=0.5)


def test_pose_from_kps5_synthetic():
    rot = _rotation(8, -20, 6)
    kps = _project(rot, np.array([0.0, 0.0, 600.0]), 640, 480,
                   model=ps.POSE_KPS5_MODEL_POINTS_3D)
    pose = ps.pose_from_kps5(kps, 640, 480)
    np.testing.assert_allclose(pose, [8, -20, 6], atol=0.5)


def test_pose_bad_input():
    with pytest.raises(ValueError):
        ps.pose_from_landmarks_2d(np.zeros((68, 2)), 640, 480)
    with pytest.raises(ValueError):
        ps.pose_from_kps5(np.zeros((106, 2)), 640, 480)
    lm = _synthetic_landmarks(np.eye(3), np.array([0.0, 0, 600]))
    lm[86] = np.nan
    assert np.all(np.isnan(ps.pose_from_landmarks_2d(lm, 640, 480)))
    assert np.all(np.isnan(ps.pose_from_landmarks_2d(
        np.zeros((106, 2)), 640, 480)))


def test_symmetry_perfect_and_invariant():
    lm = _symmetric_landmarks()
    assert ps.landmark_symmetry(lm) == pytest.approx(1.0, abs=1e-9)
    moved = _similarity(lm, 37.0, 3.5, (400.0, -20.0))
    assert ps.landmark_symmetry(moved) == pytest.approx(1.0, abs=1e-9)


def test_symmetry_similarity_and_mirror_invariance():
    rng = np.random.default_rng(1)
    lm = _symmetric_landmarks(2) + rng.normal(0, 4.0, (106, 2))
    s = ps.landmark_symmetry(lm)
    assert 0.0 < s < 1.0
    assert ps.landmark_symmetry(
        _similarity(lm, -20.0, 0.3, (5.0, 9.0))) == pytest.approx(s, abs=1e-9)
    # Mirror image: flip x and swap partner labels, as a flipped photo would.
    mirrored = lm * np.array([-1.0, 1.0])
    swapped = mirrored.copy()
    for i, j in ps.LANDMARK_MIRROR_PAIRS:
        swapped[i], swapped[j] = mirrored[j], mirrored[i]
    assert ps.landmark_symmetry(swapped) == pytest.approx(s, abs=1e-9)


def test_symmetry_decreases_with_asymmetry():
    base = _symmetric_landmarks(3)
    values = []
    for amount in (0.0, 3.0, 8.0, 20.0):
        lm = base.copy()
        right = [j for _, j in ps.LANDMARK_MIRROR_PAIRS]
        lm[right, 0] *= 1.0 - amount / 100.0  # squash one side
        values.append(ps.landmark_symmetry(lm))
    assert values[0] == pytest.approx(1.0)
    assert all(a > b for a, b in zip(values, values[1:]))
    assert all(0.0 <= v <= 1.0 for v in values)


def test_symmetry_bad_input():
    with pytest.raises(ValueError):
        ps.landmark_symmetry(np.zeros((5, 2)))
    assert math.isnan(ps.landmark_symmetry(np.zeros((106, 2))))
    lm = _symmetric_landmarks()
    lm[0, 0] = np.inf
    assert math.isnan(ps.landmark_symmetry(lm))


def test_frontality_values():
    assert ps.frontality([0, 0, 0]) == 1.0
    assert ps.frontality([0, 0, 45]) == 1.0  # roll ignored
    assert ps.frontality([0, 30, 0]) == pytest.approx(0.5)
    assert ps.frontality([0, -30, 0]) == pytest.approx(0.5)
    assert ps.frontality([30, 0, 0]) == pytest.approx(0.5)
    assert ps.frontality([0, 90, 0]) == 0.0
    assert ps.frontality([0, 170, 0]) == 0.0
    # exact off-axis angle, not the Euclidean approximation
    theta = math.degrees(math.acos(math.cos(math.radians(20)) ** 2))
    assert ps.frontality([20, 20, 0]) == pytest.approx(1 - theta / 60.0)
    assert ps.frontality([0, 15, 0], max_angle=30) == pytest.approx(0.5)
    assert math.isnan(ps.frontality([np.nan, 0, 0]))
    ys = [ps.frontality([0, y, 0]) for y in range(0, 70, 5)]
    assert all(a >= b for a, b in zip(ys, ys[1:]))


# ---------------------------------------------------------------------------
# real photos
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def app(pack_dir):
    return ps.load_face_analysis(str(pack_dir), ["detection", "landmark_2d_106"],
                                 ["CPUExecutionProvider"], 640)


def _largest_face(app, img):
    faces = app.get(img)
    assert faces, "no face detected"
    return max(faces, key=lambda f: (f.bbox[2] - f.bbox[0]) *
               (f.bbox[3] - f.bbox[1]))


def _measure(app, img):
    face = _largest_face(app, img)
    h, w = img.shape[:2]
    pose = ps.pose_from_landmarks_2d(face.landmark_2d_106, w, h)
    return face, pose


def _read(rel):
    img = cv2.imread(os.path.join(FACES, rel))
    assert img is not None, rel
    return img


@pytest.mark.parametrize("rel", FRONTAL)
def test_frontal_faces(app, rel):
    face, pose = _measure(app, _read(rel))
    assert abs(pose[1]) < 5.0, pose
    assert abs(pose[0]) < 12.0, pose
    assert ps.frontality(pose) > 0.8
    assert ps.landmark_symmetry(face.landmark_2d_106) > 0.85


@pytest.mark.parametrize("rel", TURNED_IMAGE_LEFT)
def test_turned_to_image_left(app, rel):
    face, pose = _measure(app, _read(rel))
    assert pose[1] < -12.0, pose
    h, w = _read(rel).shape[:2]
    assert ps.pose_from_kps5(face.kps, w, h)[1] < -10.0
    assert ps.landmark_symmetry(face.landmark_2d_106) < 0.75
    assert ps.frontality(pose) < 0.8


@pytest.mark.parametrize("rel", TURNED_IMAGE_RIGHT)
def test_turned_to_image_right(app, rel):
    face, pose = _measure(app, _read(rel))
    assert pose[1] > 12.0, pose
    h, w = _read(rel).shape[:2]
    assert ps.pose_from_kps5(face.kps, w, h)[1] > 10.0
    assert ps.landmark_symmetry(face.landmark_2d_106) < 0.75
    assert ps.frontality(pose) < 0.8


@pytest.mark.parametrize("rel", LOOKING_UP)
def test_looking_up(app, rel):
    _, pose = _measure(app, _read(rel))
    assert pose[0] > 10.0, pose


@pytest.mark.parametrize("rel", LOOKING_DOWN)
def test_looking_down(app, rel):
    _, pose = _measure(app, _read(rel))
    assert pose[0] < -10.0, pose


@pytest.mark.parametrize(
    "rel", FRONTAL + TURNED_IMAGE_LEFT + TURNED_IMAGE_RIGHT + LOOKING_UP
    + LOOKING_DOWN)
def test_mirror_flips_yaw_and_roll(app, rel):
    img = _read(rel)
    face, pose = _measure(app, img)
    flip_face, flip_pose = _measure(app, cv2.flip(img, 1))
    # same magnitude, opposite sign
    assert abs(pose[1] + flip_pose[1]) < 4.0, (pose, flip_pose)
    assert abs(pose[2] + flip_pose[2]) < 3.0, (pose, flip_pose)
    assert abs(pose[0] - flip_pose[0]) < 4.0, (pose, flip_pose)
    if abs(pose[1]) > 5.0:
        assert np.sign(pose[1]) == -np.sign(flip_pose[1])
    if abs(pose[2]) > 3.0:
        assert np.sign(pose[2]) == -np.sign(flip_pose[2])
    assert ps.landmark_symmetry(face.landmark_2d_106) == pytest.approx(
        ps.landmark_symmetry(flip_face.landmark_2d_106), abs=0.08)


@pytest.mark.parametrize("angle", [-20.0, 20.0])
def test_in_plane_rotation_changes_roll(app, angle):
    img = _read(FRONTAL[0])
    face, pose = _measure(app, img)
    h, w = img.shape[:2]
    cx = float(face.bbox[0] + face.bbox[2]) / 2.0
    cy = float(face.bbox[1] + face.bbox[3]) / 2.0
    # OpenCV: positive angle rotates the picture counter-clockwise on screen
    m = cv2.getRotationMatrix2D((cx, cy), angle, 1.0)
    rotated = cv2.warpAffine(img, m, (w, h), borderMode=cv2.BORDER_REPLICATE)
    _, rpose = _measure(app, rotated)
    assert rpose[2] - pose[2] == pytest.approx(-angle, abs=3.0), (pose, rpose)
    assert abs(rpose[1] - pose[1]) < 4.0
