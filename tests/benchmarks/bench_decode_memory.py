"""Peak memory of decoding one huge image, as one model worker does it.

Each case is decoded in a fresh process (decode_image_checked, the worker's
decoder); the figure is the most resident memory a 2 ms sampler saw during
the decode minus the resident memory before it (psutil), so it is what the
one file cost. The budget is MAX_DECODE_BYTES (1 GiB): a file that would need more is
refused with its reason before any pixel is decoded.

    .venv/bin/python tests/benchmarks/bench_decode_memory.py
"""

import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[2]

PROBE = r"""
import sys, threading, time
sys.path.insert(0, sys.argv[2])
import psutil, sort_faces
me = psutil.Process()
base = me.memory_info().rss
peak = [base]
done = threading.Event()

def sample():  # resident memory every 2 ms while the file decodes
    while not done.is_set():
        peak[0] = max(peak[0], me.memory_info().rss)
        time.sleep(0.002)

sampler = threading.Thread(target=sample)
sampler.start()
try:
    bgr, w, h, damage = sort_faces.decode_image_checked(sys.argv[1])
    outcome = f"decoded to {bgr.shape[1]}x{bgr.shape[0]}"
except sort_faces.UnreadableImage as error:
    outcome = f"refused: {error}"
done.set()
sampler.join()
print(f"{(peak[0] - base) / 2**20:.0f}\t{outcome}")
"""


def png_rows(path: Path, width: int, height: int, channels: int = 3) -> None:
    """A complete PNG of black pixels written row by row (small file, little memory)."""
    def chunk(kind, data):
        body = kind + data
        return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")

    packer = zlib.compressobj(9)
    row = b"\0" * (1 + channels * width)
    data = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    colour = {3: 2, 4: 6}[channels]
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, colour, 0, 0, 0])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data)
                     + chunk(b"IEND", b""))


def striped(height: int, width: int) -> np.ndarray:
    image = np.zeros((height, width, 3), np.uint8)
    image[::40] = 200
    return image


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cases = []
        for side in (20000, 30000):
            png_rows(tmp / f"png_{side}.png", side, side)
            cases.append((f"PNG {side}x{side} RGB", tmp / f"png_{side}.png"))
        png_rows(tmp / "png_10000.png", 10000, 10000)
        cases.append(("PNG 10000x10000 RGB (100 MP)", tmp / "png_10000.png"))
        png_rows(tmp / "rgba_8000.png", 8000, 8000, channels=4)
        cases.append(("PNG 8000x8000 RGBA", tmp / "rgba_8000.png"))
        cv2.imwrite(str(tmp / "jpeg_20000.jpg"), striped(15000, 20000))
        cases.append(("JPEG 20000x15000 (300 MP)", tmp / "jpeg_20000.jpg"))
        cv2.imwrite(str(tmp / "jpeg_12mp.jpg"), striped(3000, 4000))
        cases.append(("JPEG 4000x3000 (12 MP)", tmp / "jpeg_12mp.jpg"))
        cv2.imwrite(str(tmp / "tiff16.tif"), striped(6000, 8000).astype(np.uint16) * 257)
        cases.append(("TIFF 8000x6000 16-bit", tmp / "tiff16.tif"))
        print(f"budget: {1 << 30 >> 20} MB per file (MAX_DECODE_BYTES)")
        print(f"{'case':32} {'file':>9} {'peak MB':>8}  outcome")
        for label, path in cases:
            result = subprocess.run([sys.executable, "-c", PROBE, str(path), str(ROOT)],
                                    capture_output=True, text=True, check=True)
            peak, outcome = result.stdout.strip().split("\t", 1)
            size = path.stat().st_size / 2**20
            print(f"{label:32} {size:7.1f}MB {peak:>8}  {outcome[:90]}")


if __name__ == "__main__":
    main()
