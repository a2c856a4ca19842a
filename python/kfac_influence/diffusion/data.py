"""Training data for diffusion attribution: the embedded digits, an image folder, or an ``.npz`` file.

Every loader returns an :class:`ImageDataset`: images as a float32 tensor ``(N, C, H, W)`` in ``[-1, 1]``, a stable
integer id per example (``ids``, ``(N,)`` int64, used by every output of the pipeline), optional integer class
labels and, for image folders, the relative path of each file and optionally its caption (``captions``, read by
``kfac_influence.diffusion.text.with_captions`` from the folder's ``metadata.jsonl``). Ids are stable: the index
in ``load_digits`` order for the digits, the index in sorted relative-path order for a folder, the ``ids`` array of
an ``.npz`` (or its row index). Taking a subset (``limit``) keeps the original ids.

Bad input raises :class:`DataError` (a ``ValueError``) with a one-line message that names the offending file.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "DataError",
    "DataConfig",
    "ImageDataset",
    "IMAGE_EXTENSIONS",
    "load_dataset",
    "load_digits_dataset",
    "load_image_folder",
    "folder_labels",
    "load_npz",
    "resize_images",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


class DataError(ValueError):
    """Unusable input data (missing, corrupt, empty, inconsistent); the message names the file."""


@dataclass(frozen=True)
class ImageDataset(torch.utils.data.Dataset):
    """Images ``(N, C, H, W)`` float32 in [-1, 1] with stable ids ``(N,)`` int64, optional labels ``(N,)`` and
    optional captions (N strings: the text each image is conditioned on in a text-conditional run).

    Indexing returns the image tensor ``(C, H, W)``, so the dataset can be handed to anything expecting a torch
    ``Dataset`` of images.
    """

    images: torch.Tensor
    ids: torch.Tensor
    labels: Optional[torch.Tensor] = None
    paths: Optional[Tuple[str, ...]] = None
    source: str = ""
    class_names: Optional[Tuple[str, ...]] = field(default=None)
    captions: Optional[Tuple[str, ...]] = None

    def __post_init__(self):
        if self.images.ndim != 4:
            raise DataError(f"{self.source or 'data'}: images must be (N, C, H, W), got {tuple(self.images.shape)}")
        n = self.images.shape[0]
        if self.ids.shape != (n,):
            raise DataError(f"{self.source or 'data'}: ids must have shape ({n},), got {tuple(self.ids.shape)}")
        if torch.unique(self.ids).numel() != n:
            raise DataError(f"{self.source or 'data'}: ids are not unique")
        if self.labels is not None and self.labels.shape != (n,):
            raise DataError(f"{self.source or 'data'}: labels must have shape ({n},)")
        if self.paths is not None and len(self.paths) != n:
            raise DataError(f"{self.source or 'data'}: {len(self.paths)} paths for {n} images")
        if self.captions is not None and len(self.captions) != n:
            raise DataError(f"{self.source or 'data'}: {len(self.captions)} captions for {n} images")

    def __len__(self) -> int:
        return self.images.shape[0]

    @functools.cached_property
    def _fingerprint(self) -> str:
        from ..identity import tensors_fingerprint

        captioned = [] if self.captions is None else [["captions", list(self.captions)]]  # none: as before
        return tensors_fingerprint([self.images, self.ids, self.labels, list(self.names()), *captioned])

    def fingerprint(self) -> str:
        """Identity of the data as the library reads it (``identity.data_fingerprint`` uses it): a content hash
        (sha256) of the decoded images, their ids, labels and file names, in order.

        Content, not file sizes and modification times: every loader decodes every file anyway, and hashing the
        decoded tensor costs a small fraction of that (about 1 s per GB), once per data set (cached). It is exact:
        an edited, added, removed or renamed image always changes it (mtimes can be preserved by ``cp -p`` or
        ``rsync -t`` while the content changes), and a folder that was merely copied or touched keeps it, so no
        stage reruns for nothing. Resizing, channel choice and the ``limit`` subset are covered because they
        change the decoded images or the ids; captions, when the data has them, are part of it."""
        return self._fingerprint

    def names(self) -> Tuple[str, ...]:
        """A name per example for outputs meant for people: the file name (relative path) for an image folder,
        else ``"<source>#<id>"`` (e.g. ``digits#17``)."""
        if self.paths is not None:
            return tuple(self.paths)
        base = os.path.basename(self.source) if self.source else "data"
        return tuple(f"{base}#{int(i)}" for i in self.ids.tolist())

    def __getitem__(self, i):
        return self.images[i]

    @property
    def shape(self) -> Tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return tuple(self.images.shape[1:])

    def subset(self, index) -> "ImageDataset":
        """The examples at positions ``index`` (a sequence or tensor of ints), keeping their original ids."""
        index = torch.as_tensor(index, dtype=torch.long)
        return ImageDataset(
            images=self.images[index].contiguous(),
            ids=self.ids[index].clone(),
            labels=None if self.labels is None else self.labels[index].clone(),
            paths=None if self.paths is None else tuple(self.paths[i] for i in index.tolist()),
            source=self.source,
            class_names=self.class_names,
            captions=None if self.captions is None else tuple(self.captions[i] for i in index.tolist()),
        )


@dataclass(frozen=True)
class DataConfig:
    """Where the training data comes from and how it is prepared.

    source: ``"digits"`` (scikit-learn's bundled 8x8 digits), a folder of PNG/JPEG images, or an ``.npz`` file.
    image_size: resize to ``image_size x image_size`` (``None``: keep the native size; a folder then needs all
        images to share one size).
    limit: use only ``limit`` (>= 1) examples, a seeded random subset (``None``: all of them); ids are kept.
    seed: seed of that subset.
    channels: force 1 (grey) or 3 (RGB) for an image folder; ``None``: infer, mixed channel counts are an error.
    labels: class labels are required (``True``: the digits' digit, an ``.npz``'s ``labels`` array, or for an
        image folder one sub-folder per class, torchvision's ``ImageFolder`` convention: class index = position
        of the sub-folder's name in sorted order); ``False`` / ``None``: not required (a folder then has no
        labels). The pipeline resolves ``None`` ("auto") to whether the model is class-conditional
        (``kfac_influence.app.settings.class_conditional``).
    """

    source: str = "digits"
    image_size: Optional[int] = None
    limit: Optional[int] = None
    seed: int = 0
    channels: Optional[int] = None
    labels: Optional[bool] = None

    def __post_init__(self):
        if self.labels not in (None, True, False):
            raise DataError(f"labels must be true, false or none (auto), got {self.labels!r}")
        if not isinstance(self.source, str) or not self.source:
            raise DataError("data source must be 'digits', a folder or an .npz file")
        if self.image_size is not None and (int(self.image_size) != self.image_size or self.image_size < 1):
            raise DataError(f"image_size must be a positive integer, got {self.image_size!r}")
        if self.limit is not None and (int(self.limit) != self.limit or self.limit < 1):
            raise DataError(f"limit must be a whole number >= 1 (or none: all examples), got {self.limit!r}")
        if self.channels not in (None, 1, 3):
            raise DataError(f"channels must be 1, 3 or None, got {self.channels!r}")


def resize_images(images: torch.Tensor, size: Optional[int]) -> torch.Tensor:
    """Bilinear (antialiased when shrinking) resize of ``(N, C, H, W)`` to ``(N, C, size, size)``; clamps to [-1, 1]."""
    if size is None or tuple(images.shape[-2:]) == (size, size):
        return images
    shrink = size < max(images.shape[-2:])
    out = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
    return out.clamp_(-1.0, 1.0)


def load_digits_dataset(image_size: Optional[int] = None) -> ImageDataset:
    """scikit-learn's 1797 bundled 8x8 grey digits, pixel values 0..16 mapped linearly to [-1, 1].

    Returns images ``(1797, 1, S, S)`` with ``S = image_size or 8``, ids ``0..1796`` (the ``load_digits`` order)
    and labels (the digit, 0..9).
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    x = resize_images(x, image_size)
    return ImageDataset(
        images=x.contiguous(),
        ids=torch.arange(x.shape[0], dtype=torch.long),
        labels=torch.as_tensor(bunch.target, dtype=torch.long),
        source="digits",
        class_names=tuple(str(i) for i in range(10)),
    )


def _list_images(root: str):
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
                found.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(found)


def _read_image(path: str, channels: Optional[int], size: Optional[int]) -> np.ndarray:
    """One image as float32 ``(C, H, W)`` in [-1, 1]; raises DataError naming ``path``."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if channels is None:
                if mode in ("1", "L", "LA", "I", "I;16", "F"):
                    target = "L"
                elif mode in ("RGB", "RGBA", "P", "CMYK", "YCbCr"):
                    target = "RGB"
                else:
                    raise DataError(f"{path}: unsupported image mode {mode!r}")
            else:
                target = "L" if channels == 1 else "RGB"
            if mode == "P" and target == "RGB":
                im = im.convert("RGBA")
            im = im.convert(target)
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.float32)
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: cannot read image ({type(exc).__name__}: {exc})".splitlines()[0]) from None
    if arr.ndim == 2:
        arr = arr[None]
    else:
        arr = arr.transpose(2, 0, 1)
    return arr / 127.5 - 1.0


def folder_labels(rel_paths) -> Tuple[torch.Tensor, Tuple[str, ...]]:
    """Class labels of images at relative paths ``class/.../file.png`` (torchvision's ``ImageFolder``
    convention): the class is the first path component, its index the position of that name among the sorted
    names of the sub-folders holding images. Returns ``(labels (N,) int64, class_names)``; an image directly in
    the root is a ``DataError``."""
    top = []
    for r in rel_paths:
        parts = r.replace(os.sep, "/").split("/")
        if len(parts) < 2:
            raise DataError(f"{r}: labelled image folders need one sub-folder per class (class/image.png); this "
                            f"image is in the top folder")
        top.append(parts[0])
    names = tuple(sorted(set(top)))
    index = {c: i for i, c in enumerate(names)}
    return torch.tensor([index[c] for c in top], dtype=torch.long), names


def load_image_folder(root: str, image_size: Optional[int] = None, channels: Optional[int] = None,
                      labels: bool = False) -> ImageDataset:
    """All PNG/JPEG files under ``root`` (recursive, sorted by relative path), as ``(N, C, S, S)`` in [-1, 1].

    Grey images give C = 1 and colour images C = 3; with ``channels=None`` a folder mixing the two is an error
    (naming the first file that differs). ``image_size=None`` requires all images to have the same size.
    ``paths`` holds the relative path of each image; ids are ``0..N-1`` in path order. Labels: with
    ``labels=True`` from the sub-folders (``folder_labels``: one per class, sorted names), else not set.
    """
    if not os.path.exists(root):
        raise DataError(f"{root}: no such file or folder")
    if not os.path.isdir(root):
        raise DataError(f"{root}: not a folder (expected a folder of images, an .npz file, or 'digits')")
    rel = _list_images(root)
    if not rel:
        raise DataError(f"{root}: no PNG or JPEG images found")
    arrays = []
    for r in rel:
        path = os.path.join(root, r)
        arr = _read_image(path, channels, image_size)
        if arrays:
            first = arrays[0]
            if arr.shape[0] != first.shape[0]:
                raise DataError(f"{path}: has {arr.shape[0]} channel(s) but {os.path.join(root, rel[0])} has "
                                f"{first.shape[0]} (mixed grey and colour images; pass channels=1 or 3)")
            if arr.shape != first.shape:
                raise DataError(f"{path}: size {arr.shape[1]}x{arr.shape[2]} differs from "
                                f"{first.shape[1]}x{first.shape[2]} (pass an image size to resize)")
        arrays.append(arr)
    images = torch.from_numpy(np.stack(arrays)).contiguous()
    y, class_names = folder_labels(rel) if labels else (None, None)
    return ImageDataset(images=images, ids=torch.arange(len(rel), dtype=torch.long), labels=y, paths=tuple(rel),
                        source=os.path.abspath(root), class_names=class_names)


def load_npz(path: str, image_size: Optional[int] = None) -> ImageDataset:
    """Images from an ``.npz`` with key ``images`` (or ``x``), and optional ``labels`` (or ``y``) and ``ids``.

    Accepted layouts: ``(N, H, W)``, ``(N, C, H, W)`` with C in {1, 3}, or ``(N, H, W, C)``. Integer (uint8)
    arrays are mapped from 0..255, float arrays are taken as [0, 1] when their range fits it, else as [-1, 1].
    """
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as exc:  # zipfile.BadZipFile, ValueError, OSError, EOFError ...
        raise DataError(f"{path}: cannot read .npz ({type(exc).__name__}: {exc})".splitlines()[0]) from None
    key = next((k for k in ("images", "x", "X") if k in arrays), None)
    if key is None:
        raise DataError(f"{path}: no 'images' array (found: {', '.join(sorted(arrays)) or 'none'})")
    x = arrays[key]
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[1] not in (1, 3) and x.shape[-1] in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    if x.ndim != 4 or x.shape[1] not in (1, 3) or x.shape[0] == 0:
        raise DataError(f"{path}: images must be (N, H, W), (N, C, H, W) or (N, H, W, C) with C in 1 or 3, "
                        f"got {x.shape}")
    if np.issubdtype(x.dtype, np.integer):
        xf = x.astype(np.float32) / 127.5 - 1.0
    else:
        xf = x.astype(np.float32)
        if not np.isfinite(xf).all():
            raise DataError(f"{path}: images contain NaN or infinite values")
        if xf.min() >= 0.0 and xf.max() <= 1.0:
            xf = xf * 2.0 - 1.0
        elif xf.min() < -1.0 - 1e-6 or xf.max() > 1.0 + 1e-6:
            raise DataError(f"{path}: float images must lie in [0, 1] or [-1, 1], got [{xf.min()}, {xf.max()}]")
    n = xf.shape[0]
    ids = arrays.get("ids")
    ids = torch.arange(n, dtype=torch.long) if ids is None else torch.as_tensor(np.asarray(ids), dtype=torch.long)
    lab = arrays.get("labels", arrays.get("y"))
    labels = None if lab is None else torch.as_tensor(np.asarray(lab), dtype=torch.long)
    images = resize_images(torch.from_numpy(np.ascontiguousarray(xf)), image_size).contiguous()
    try:
        return ImageDataset(images=images, ids=ids, labels=labels, source=os.path.abspath(path))
    except DataError as exc:
        raise DataError(f"{path}: {exc}") from None


def load_dataset(config: DataConfig) -> ImageDataset:
    """Load the data described by ``config`` (see :class:`DataConfig`), then take the seeded ``limit`` subset."""
    src = config.source
    if src == "digits":
        data = load_digits_dataset(config.image_size)
        if config.channels == 3:
            data = ImageDataset(images=data.images.repeat(1, 3, 1, 1), ids=data.ids, labels=data.labels,
                                source=data.source, class_names=data.class_names)
    elif src.lower().endswith(".npz"):
        data = load_npz(src, config.image_size)
        if config.channels is not None and data.images.shape[1] != config.channels:
            raise DataError(f"{src}: has {data.images.shape[1]} channel(s), expected {config.channels}")
    else:
        data = load_image_folder(src, config.image_size, config.channels, labels=bool(config.labels))
    if config.labels and data.labels is None:
        raise DataError(f"{src}: labels were asked for but the data has none (an .npz needs a 'labels' array)")
    if config.labels and data.labels.numel() and int(data.labels.min()) < 0:
        raise DataError(f"{src}: class labels must be >= 0, got {int(data.labels.min())}")
    if config.limit is not None and config.limit < len(data):
        g = torch.Generator().manual_seed(int(config.seed))
        index = torch.randperm(len(data), generator=g)[: config.limit].sort().values
        data = data.subset(index)
    return data
