"""Video frames for video VLMs: read a clip, sample its frames uniformly or at a frame rate, write test clips.

Two decoders, both optional (``pip install 'vlm-compress[video]'`` installs both): decord
(https://github.com/dmlc/decord, what LLaVA-OneVision / LLaVA-Video and lmms-eval read videos with) and PyAV
(https://pyav.org, FFmpeg's Python binding). ``backend="auto"`` takes decord when it imports, PyAV otherwise; both
return the same frame indices and, up to colour conversion, the same pixels.

Uniform sampling is lmms-eval's LLaVA-OneVision loader's rule (``lmms_eval/models/simple/llava_onevision.py``,
``load_video``; also ``load_video_decord`` in ``lmms_eval/models/model_utils/load_video.py``):
``np.linspace(0, total - 1, n, dtype=int)``, first and last frame included, positions in between rounded down.
Frame-rate sampling is lmms-eval's LLaVA-Video loader's (``lmms_eval/models/simple/llava_vid.py``, ``load_video``):
one frame every ``source_fps / fps`` frames from frame 0, and the uniform rule instead when that gives more than
``num_frames``; the loader rounds the step (``range(0, total, round(source_fps / fps))``), here it is not rounded,
so 1 fps from 29.97 fps takes frames 0, 29, 59, … (at 0, 0.97, 1.97 s) rather than 0, 30, 60, … (drifting 0.1%).

Reading is strict: a source that is not a video, holds no frame, or is cut short raises :class:`VideoReadError`;
no clip is ever returned with a frame missing. A frame counts as decodable when it and every frame before it
(presentation order) decode without error and without FFmpeg's corrupt flag (set for a packet cut by a truncation);
if a sampled index is at or past the first frame that does not, the read fails naming that index and how many frames
decoded. The frame count sampling works from is the one the container declares (MP4, AVI) or, where it declares
none (Matroska, WebM), the frames it holds: a truncated file of the second kind reads as the shorter video it is.
decord's own count is the packets it can read and it conceals a cut final packet with a copy of the frame before,
so the decord reader checks its count against the declared one through PyAV's demuxer when PyAV is installed;
a file decord cannot index at all (e.g. an MP4 cut after its header) fails with decord's reason, not an index.
decord seeks by timestamp, and in an AVI (no presentation timestamps to seek by; an H.264 stream with B-frames) a
seek lands on a neighbouring frame now and then (4 of 40 reads of the test clip's frame 23 gave frame 19), so AVI
files are read by decord sequentially, frame by frame up to the last sampled one, which is always exact.
"""

from __future__ import annotations

import dataclasses
import errno
import fractions
import io
import os
import tempfile
from typing import TYPE_CHECKING, Any, BinaryIO, Sequence

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["BACKENDS", "VideoClip", "VideoReadError", "read_video", "sample_indices", "write_video"]

BACKENDS = ("auto", "decord", "av")
INSTALL_HINT = "pip install 'vlm-compress[video]'"
REENCODE_HINT = "re-download it, or re-encode it if it plays elsewhere (ffmpeg -i IN -c:v libx264 OUT.mp4)"
# FFmpeg demuxers that open stills and text as one-stream "videos": image pipes, image2 (by extension), ANSI art
NOT_VIDEO_FORMATS = ("image2", "tty")


class VideoReadError(ValueError):
    """The source is not a readable video: not a video at all, no decodable frame, or cut short."""


@dataclasses.dataclass(frozen=True)
class VideoClip:
    """Frames sampled from a video, with where they came from.

    ``frames`` [N, H, W, 3] uint8 RGB; ``timestamps`` [N] float64 seconds, each frame's ``index / fps`` (its
    nominal time at the source's average rate, the same for both backends); ``indices`` [N] int64, each frame's
    position in the source (presentation order, from 0); ``fps`` the source's average frame rate;
    ``num_source_frames`` the frames sampling worked from (see the module docstring); ``backend`` ``"decord"``
    or ``"av"``.
    """

    frames: np.ndarray
    timestamps: np.ndarray
    indices: np.ndarray
    fps: float
    num_source_frames: int
    backend: str

    def __len__(self) -> int:
        return len(self.frames)

    def to_pil(self) -> list[Image.Image]:
        """The frames as RGB PIL images, e.g. for a processor's ``videos=`` / ``images=`` argument."""
        from PIL import Image

        return [Image.fromarray(frame) for frame in self.frames]


def _check_request(num_frames: int | None, fps: float | None) -> None:
    if num_frames is None and fps is None:
        raise ValueError("give num_frames (uniform sampling), fps (frame-rate sampling) or both")
    if num_frames is not None and (isinstance(num_frames, bool) or not isinstance(num_frames, (int, np.integer))
                                   or num_frames < 1):
        raise ValueError(f"num_frames must be an integer >= 1, got {num_frames!r}")
    if fps is not None and not (isinstance(fps, (int, float, np.number)) and np.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive number of frames per second, got {fps!r}")


def sample_indices(total: int, num_frames: int | None = None, *, fps: float | None = None,
                   source_fps: float | None = None) -> np.ndarray:
    """Which of ``total`` frames to read: [n] int64, ascending, no duplicates.

    Uniform (``num_frames`` only): ``np.linspace(0, total - 1, num_frames, dtype=int)``, lmms-eval's
    LLaVA-OneVision rule, e.g. 8 of 24 frames → 0 3 6 9 13 16 19 23. Asking for more frames than ``total`` (or as
    many) returns every frame once. Frame rate (``fps``, needs ``source_fps``): frames ``floor(k * source_fps /
    fps)`` for k = 0, 1, … below ``total``, e.g. 2 fps from 24 frames at 8 fps → 0 4 8 12 16 20 (every frame once
    when ``fps`` exceeds ``source_fps``); with ``num_frames`` too, the uniform ``num_frames`` instead when the
    frame rate gives more than ``num_frames`` (LLaVA-Video's cap).
    ``total == 0`` raises :class:`VideoReadError`; ``num_frames < 1``, ``fps <= 0`` or a missing ``source_fps``
    raise ``ValueError``.
    """
    _check_request(num_frames, fps)
    if total < 0:
        raise ValueError(f"total must be >= 0, got {total}")
    if total == 0:
        raise VideoReadError("the video holds no decodable frame, so there is nothing to sample")
    if fps is not None:
        if source_fps is None or not source_fps > 0:
            raise ValueError(f"fps sampling needs the source's frame rate: source_fps must be > 0, got {source_fps!r}")
        count = int(np.ceil(total * fps / source_fps)) + 1
        # (k * source_fps) / fps, not k * (source_fps / fps): whole-frame positions stay exact (3 * 10 / 3 == 10)
        picks = np.floor(np.arange(count) * float(source_fps) / float(fps) + 1e-9).astype(np.int64)
        picks = np.unique(picks[picks < total])
        if num_frames is None or len(picks) <= num_frames:
            return picks
    if num_frames >= total:
        return np.arange(total, dtype=np.int64)
    return np.linspace(0, total - 1, num_frames, dtype=int).astype(np.int64)


def _import_backend(name: str) -> Any:
    try:
        return __import__(name)
    except ImportError as error:
        package = {"av": "PyAV (av)", "decord": "decord"}[name]
        raise ImportError(f"backend={name!r} needs {package}, which is not installed: {INSTALL_HINT}") from error


def _resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}; got {backend!r}")
    if backend != "auto":
        return backend
    for name in ("decord", "av"):
        try:
            __import__(name)
            return name
        except ImportError:
            pass
    raise ImportError(f"reading videos needs decord or PyAV (av), and neither is installed: {INSTALL_HINT}")


def _load_source(source: str | os.PathLike | bytes | BinaryIO) -> tuple[str, str | bytes]:
    """``(name for messages, path or bytes)``. A file object is read from where it stands to its end."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, name = bytes(source), f"<{len(source)} bytes>"
    elif hasattr(source, "read"):
        data = source.read()
        if not isinstance(data, bytes):
            raise TypeError(f"read_video needs a binary file object (open(path, 'rb')); .read() gave {type(data)}")
        name = f"<file {getattr(source, 'name', type(source).__name__)}>"
    elif isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.exists(path):
            raise FileNotFoundError(errno.ENOENT, "no video file at this path", path)
        if not os.path.isfile(path):
            raise VideoReadError(f"{path!r} is not a file; give the path of a video file")
        if os.path.getsize(path) == 0:
            raise VideoReadError(f"{path!r} is empty (0 bytes), not a video; {REENCODE_HINT}")
        return repr(path), path
    else:
        raise TypeError(f"source must be a path, bytes or a binary file object, got {type(source).__name__}")
    if not data:
        raise VideoReadError(f"{name} is empty (0 bytes), not a video")
    return name, data


def _first_line(error: object) -> str:
    """The informative line of a backend's error (decord's carry a C++ backtrace after it)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0][:200] if lines else type(error).__name__


def _not_readable(name: str, backend: str, error: object) -> VideoReadError:
    return VideoReadError(f"{name} could not be read as a video by {backend} ({_first_line(error)}): it is not a "
                          f"video, or is damaged or truncated; {REENCODE_HINT}")


def _truncated(name: str, backend: str, index: int, total: int, decodable: int | None = None,
               reason: object = None) -> VideoReadError:
    """``decodable``: the frames PyAV decodes, or the frames decord finds (the last of them possibly a concealed
    copy of the one before); None when the backend failed on frame ``index`` itself, for ``reason``."""
    if decodable is None:
        what = f"{backend} fails on it ({_first_line(reason)})"
    elif decodable == 0:
        what = f"the video declares {total} frames but none of them decodes"
    elif backend == "decord":
        what = f"the video declares {total} frames but decord finds only {decodable} (frames 0..{decodable - 1})"
    else:
        what = f"the video declares {total} frames but only {decodable} decode (frames 0..{decodable - 1})"
    return VideoReadError(f"{name}: sampled frame {index} cannot be decoded by {backend}: {what}; the file is "
                          f"truncated or damaged, {REENCODE_HINT}")


def _open_av(av: Any, data: str | bytes) -> Any:
    return av.open(data if isinstance(data, str) else io.BytesIO(data), mode="r")


def _av_stream(container: Any, name: str) -> Any:
    """The first video stream, refusing stills and text that FFmpeg opens as one-frame "videos"."""
    format_name = container.format.name
    if not container.streams.video or format_name in NOT_VIDEO_FORMATS or format_name.endswith("pipe"):
        kind = "no video stream" if not container.streams.video else f"FFmpeg reads it as {format_name!r}"
        raise VideoReadError(f"{name} is not a video ({kind}); give a video file such as .mp4, .mkv, .webm, .avi")
    return container.streams.video[0]


def _av_declared_frames(av: Any, name: str, data: str | bytes) -> int:
    """The frame count the container declares (0 when it declares none); also checks that it holds a video."""
    try:
        with _open_av(av, data) as container:
            return int(_av_stream(container, name).frames or 0)
    except av.FFmpegError as error:
        raise _not_readable(name, "PyAV", error) from None


def _read_av(name: str, data: str | bytes, num_frames: int | None, fps: float | None):
    av = _import_backend("av")
    try:
        with _open_av(av, data) as container:
            stream = _av_stream(container, name)
            rate = float(stream.average_rate or stream.guessed_rate or 0)
            total = int(stream.frames or 0)
            if not total:  # Matroska / WebM declare no count: count the intact packets (no decoding)
                total = sum(1 for packet in container.demux(stream) if packet.size and not packet.is_corrupt)
    except av.FFmpegError as error:
        raise _not_readable(name, "PyAV", error) from None
    if rate <= 0:
        raise VideoReadError(f"{name} declares no frame rate, so frames cannot be timed; {REENCODE_HINT}")
    if total == 0:
        raise VideoReadError(f"{name} holds no decodable video frame; {REENCODE_HINT}")
    indices = sample_indices(total, num_frames, fps=fps, source_fps=rate)
    wanted, last = set(indices.tolist()), int(indices[-1])
    frames: dict[int, np.ndarray] = {}
    decoded = 0
    try:
        with _open_av(av, data) as container:  # reopened: the count above may have read the whole file
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            # Sequential decoding, stopped after the last wanted frame: exact indices with no seek to trust.
            for frame in container.decode(stream):
                if frame.is_corrupt:
                    break
                if decoded in wanted:
                    frames[decoded] = frame.to_ndarray(format="rgb24")
                decoded += 1
                if decoded > last:
                    break
    except av.FFmpegError:
        pass  # a damaged packet ends the decodable frames; whether a sampled one is missing is checked below
    if decoded <= last:
        raise _truncated(name, "PyAV", int(indices[indices >= decoded][0]), total, decoded)
    return np.stack([frames[i] for i in indices.tolist()]), indices, rate, total


def _is_avi(path: str) -> bool:
    """Whether ``path`` is a RIFF AVI file (magic ``RIFF····AVI ``)."""
    with open(path, "rb") as file:
        head = file.read(12)
    return head[:4] == b"RIFF" and head[8:12] == b"AVI "


def _decord_in_order(reader: Any, indices: np.ndarray, name: str, total: int, failures: tuple) -> np.ndarray:
    """``[n, H, W, 3]`` the frames at ``indices`` (ascending), decoded in order from frame 0 with no seek."""
    wanted, out = set(indices.tolist()), []
    for index in range(int(indices[-1]) + 1):
        try:
            frame = reader.next()
        except (*failures, StopIteration) as error:
            raise _truncated(name, "decord", int(indices[indices >= index][0]), total, reason=error) from None
        if index in wanted:
            out.append(frame.asnumpy() if hasattr(frame, "asnumpy") else frame.numpy())
    return np.ascontiguousarray(np.stack(out), dtype=np.uint8)


def _read_decord(name: str, data: str | bytes, num_frames: int | None, fps: float | None):
    decord = _import_backend("decord")
    if isinstance(data, bytes):
        # decord's in-memory reader segfaults on some damaged files (a truncated AVI) that it reads from a path
        # with an error, so bytes go through a temporary file
        with tempfile.TemporaryDirectory(prefix="vlm_compress_video_") as tmp:
            path = os.path.join(tmp, "video")
            with open(path, "wb") as file:
                file.write(data)
            return _read_decord(name, path, num_frames, fps)
    try:
        av = __import__("av")
    except ImportError:
        av = None  # decord alone: its own count is all there is (see the module docstring)
    declared = _av_declared_frames(av, name, data) if av is not None else 0
    try:
        reader = decord.VideoReader(data, num_threads=0)
        readable, rate = len(reader), float(reader.get_avg_fps())
    except (decord.DECORDError, RuntimeError, AssertionError) as error:
        raise _not_readable(name, "decord", error) from None
    if rate <= 0:
        raise VideoReadError(f"{name} declares no frame rate, so frames cannot be timed; {REENCODE_HINT}")
    total = max(declared, readable)
    indices = sample_indices(total, num_frames, fps=fps, source_fps=rate)
    if indices[-1] >= readable:
        raise _truncated(name, "decord", int(indices[indices >= readable][0]), total, readable)
    failures = (decord.DECORDError, RuntimeError)
    if _is_avi(data):
        return _decord_in_order(reader, indices, name, total, failures), indices, rate, total
    try:
        batch = reader.get_batch(indices.tolist())
    except failures as batch_error:
        for index in indices.tolist():  # find the first sampled frame that fails, for the message
            try:
                reader[index]
            except failures as error:
                raise _truncated(name, "decord", index, total, reason=error) from None
        raise _not_readable(name, "decord", batch_error) from None
    # decord.bridge.set_bridge("torch") elsewhere in the process makes get_batch return a torch tensor
    frames = batch.asnumpy() if hasattr(batch, "asnumpy") else batch.numpy()
    return np.ascontiguousarray(frames, dtype=np.uint8), indices, rate, total


def read_video(source: str | os.PathLike | bytes | BinaryIO, num_frames: int | None = None, *,
               fps: float | None = None, backend: str = "auto") -> VideoClip:
    """Decode the sampled frames of a video (see :func:`sample_indices` for which).

    ``source``: a path, the file's bytes, or a binary file object (read from its position to its end).
    ``backend``: ``"auto"`` (decord if installed, else PyAV), ``"decord"`` or ``"av"``. Raises
    ``FileNotFoundError`` for a missing path, :class:`VideoReadError` for anything that is not a fully readable
    video at the sampled frames (module docstring), ``ImportError`` when the backend is not installed and
    ``ValueError`` for bad arguments (checked before anything is read).
    """
    _check_request(num_frames, fps)
    chosen = _resolve_backend(backend)
    name, data = _load_source(source)
    reader = _read_decord if chosen == "decord" else _read_av
    frames, indices, rate, total = reader(name, data, num_frames, fps)
    return VideoClip(frames=frames, timestamps=indices / rate, indices=indices, fps=rate, num_source_frames=total,
                     backend=chosen)


def _add_stream(av: Any, container: Any, rate: fractions.Fraction) -> Any:
    """A libx264 stream where this FFmpeg and the container have it, else MPEG-4 Part 2, else VP9 (WebM)."""
    for codec in ("libx264", "mpeg4", "libvpx-vp9"):
        try:
            return container.add_stream(codec, rate=rate)
        except (ValueError, av.FFmpegError):  # encoder missing from this FFmpeg, or not allowed in this container
            continue
    raise ValueError(f"no libx264, mpeg4 or libvpx-vp9 encoder for the {container.format.name!r} container; "
                     "write .mp4, .mkv or .avi")


def write_video(path: str | os.PathLike, frames: np.ndarray | Sequence[np.ndarray], fps: float = 8.0) -> None:
    """Encode [N, H, W, 3] uint8 RGB frames (H, W even: yuv420p halves the chroma) to ``path`` with PyAV.

    libx264 where this FFmpeg and the container have it, else mpeg4, else VP9; the container follows the extension
    (.mp4, .mkv, .avi, .webm, …).
    For tests and synthetic clips; the codec is lossy, so frames read back close to, not equal to, these.
    """
    av = _import_backend("av")
    frames = np.stack(frames) if not isinstance(frames, np.ndarray) else frames
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(f"frames must be [N, H, W, 3] uint8 with N >= 1, got {frames.shape} {frames.dtype}")
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"frame height and width must be even for yuv420p, got {height}x{width}; crop or pad by one")
    if not (np.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be > 0, got {fps!r}")
    with av.open(os.fspath(path), mode="w") as container:
        stream = _add_stream(av, container, fractions.Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode(None))
