"""Synthetic videos made with PyAV from the shared photos, for the video tests
and tests/benchmarks/bench_video.py: known people per time span, rotation
metadata, variable frame rates, 10-bit HEVC, and damaged copies. Everything is
written where the caller says (a temporary folder), never in the work tree."""

from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FACES = ROOT.parent / "shared" / "data" / "faces"
CLIP = ROOT.parent / "shared" / "data" / "video" / "short_hamilton_clip.mp4"


def letterbox(photo: Path, width: int, height: int) -> np.ndarray:
    """The photo scaled to fit width x height on black, as a BGR frame."""
    image = cv2.imread(str(photo), cv2.IMREAD_COLOR)
    scale = min(width / image.shape[1], height / image.shape[0])
    resized = cv2.resize(image, (max(1, round(image.shape[1] * scale)),
                                 max(1, round(image.shape[0] * scale))),
                         interpolation=cv2.INTER_AREA)
    frame = np.zeros((height, width, 3), np.uint8)
    top, left = (height - resized.shape[0]) // 2, (width - resized.shape[1]) // 2
    frame[top:top + resized.shape[0], left:left + resized.shape[1]] = resized
    return frame


def zoom(frame: np.ndarray, factor: float) -> np.ndarray:
    """The frame's centre enlarged by `factor` to the frame's size."""
    height, width = frame.shape[:2]
    matrix = np.array([[factor, 0, width / 2 * (1 - factor)],
                       [0, factor, height / 2 * (1 - factor)]], np.float32)
    return cv2.warpAffine(frame, matrix, (width, height), flags=cv2.INTER_LINEAR)


def make_video(path: Path, spans, *, fps: int = 10, size=(1280, 720), codec: str = "libx264",
               pix_fmt: str = "yuv420p", rotation: int = 0, times=None, gop: int | None = None,
               faststart: bool = False, turn_pixels: int = 0, motion: bool = False) -> Path:
    """A video of `spans`: (photo path, seconds) shown one after another.

    times: the presentation time of each frame in seconds (a variable frame
    rate), instead of a steady `fps`. rotation: display-matrix degrees,
    counter-clockwise (the pixels are stored turned `turn_pixels` quarter turns
    clockwise, so that the display shows them upright). gop: frames between
    keyframes. faststart: the index (moov) before the frames, so a truncated
    copy still has it. motion: each shot slowly zooms in (every frame differs,
    as in real footage, so a decoder does real work).
    """
    import av

    width, height = size
    stored = (height, width) if turn_pixels % 2 else (width, height)

    def frames():  # one at a time: a long video never sits in memory
        for photo, seconds in spans:
            still = letterbox(photo, width, height)
            count = int(round(seconds * fps))
            for i in range(count):
                frame = zoom(still, 1 + 0.1 * i / count) if motion else still
                yield np.ascontiguousarray(np.rot90(frame, -turn_pixels)) if turn_pixels \
                    else frame

    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = stored
        stream.pix_fmt = pix_fmt
        stream.time_base = Fraction(1, 1000)
        if gop:
            stream.codec_context.gop_size = gop
        if codec == "libx265":
            stream.codec_context.options = {"x265-params": "log-level=none"}
        if rotation:
            stream.set_display_rotation(rotation)
        for index, pixels in enumerate(frames()):
            frame = av.VideoFrame.from_ndarray(pixels, format="bgr24")
            seconds = times[index] if times is not None else index / fps
            frame.pts = int(round(seconds * 1000))
            frame.time_base = Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return Path(path)


def write_frames(path: Path, frames, times, **kwargs) -> Path:
    """A video of these frames at these presentation times (seconds)."""
    import av

    codec = kwargs.get("codec", "libx264")
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=1000)  # ms times
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        stream.time_base = Fraction(1, 1000)
        if kwargs.get("gop"):
            stream.codec_context.gop_size = kwargs["gop"]
            stream.codec_context.options = {"x264-params": "scenecut=0:keyint-min=1"}
        for pixels, seconds in zip(frames, times):
            frame = av.VideoFrame.from_ndarray(pixels, format="bgr24")
            frame.pts, frame.time_base = int(round(seconds * 1000)), Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def mjpeg_of(path: Path, frames) -> Path:
    """An MJPEG video of these BGR frames, one a second, each a JPEG of its own
    size, the header giving the first one's (as a camera that changes
    resolution mid-stream writes it)."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mjpeg", rate=1)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuvj420p"
        stream.time_base = Fraction(1, 1000)
        for index, pixels in enumerate(frames):
            _ok, jpeg = cv2.imencode(".jpg", pixels)
            packet = av.Packet(jpeg.tobytes())
            packet.stream, packet.time_base = stream, Fraction(1, 1000)
            packet.pts = packet.dts = index * 1000
            packet.is_keyframe = True
            container.mux(packet)
    return Path(path)


def people_photos(person: str, count: int, collection: str = "five_celebs") -> list[Path]:
    """The first `count` photos of one person of a shared collection."""
    photos = sorted(p for p in (FACES / collection / person).iterdir()
                    if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    return photos[:count]


def truncate(src: Path, dst: Path, keep: float = 0.5) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[:int(len(data) * keep)])
    return dst


def damage_middle(src: Path, dst: Path, at: float = 0.5, length: int = 4096) -> Path:
    """A copy with `length` bytes of noise written over the middle of the file."""
    data = bytearray(src.read_bytes())
    start = int(len(data) * at)
    data[start:start + length] = np.random.default_rng(0).integers(
        0, 256, min(length, len(data) - start), dtype=np.uint8).tobytes()
    dst.write_bytes(bytes(data))
    return dst


def audio_only(path: Path, seconds: float = 1.0) -> Path:
    """An .mp4 holding one AAC audio stream and no video."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        samples = np.zeros((1, int(16000 * seconds)), np.float32)
        frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return Path(path)
