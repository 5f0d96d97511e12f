"""Observation encoders for the QueST prior (spec §4.1) and image augmentation (spec §2.4).

Everything is written in plain torch: torchvision is not installable in this environment, so the
ResNet-18 stem and the colour jitter are small local implementations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IMAGE_SIZE = 128  # images larger than this are resized to it (spec §2.4)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with BatchNorm and an identity/projection shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class ResNetTrunk(nn.Module):
    """ResNet-18 cut after layer2, from scratch (spec §4.1): (B,3,128,128) -> (B,128,16,16)."""

    out_channels = 128

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
        self.layer1 = nn.Sequential(BasicBlock(64, 64), BasicBlock(64, 64))
        self.layer2 = nn.Sequential(BasicBlock(64, 128, stride=2), BasicBlock(128, 128))
        for m in self.modules():  # torchvision's default ResNet initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer2(self.layer1(self.stem(x)))


class SpatialSoftmax(nn.Module):
    """Per-channel softmax over pixels, then expected (x, y) on a [-1, 1] grid (spec §4.1).

    (B, C, H, W) -> (B, 2C), ordered [x_0, y_0, x_1, y_1, ...]. With as many keypoints as
    channels the original's 1x1 keypoint conv is skipped, so there is none here.
    """

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        attn = torch.softmax(x.reshape(b, c, h * w), dim=-1)
        ys, xs = torch.meshgrid(
            torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype),
            torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype),
            indexing="ij",
        )
        grid = torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1)  # (HW, 2)
        return (attn @ grid).reshape(b, 2 * c)


class ImageEncoder(nn.Module):
    """One camera: ResNetTrunk -> SpatialSoftmax -> Linear(2C -> out_dim)."""

    def __init__(self, out_dim: int):
        super().__init__()
        self.trunk = ResNetTrunk()
        self.keypoints = SpatialSoftmax()
        self.proj = nn.Linear(2 * ResNetTrunk.out_channels, out_dim)

    def forward(self, img: Tensor) -> Tensor:  # (B, 3, H, W) float in [0, 1] -> (B, out_dim)
        return self.proj(self.keypoints(self.trunk(img)))


# ---------------------------------------------------------------- augmentation (spec §2.4)

def _gray(img: Tensor) -> Tensor:
    """ITU-R 601 luma (B, 1, H, W), the weights torchvision's jitter uses."""
    r, g, b = img.unbind(1)
    return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def _rgb_to_hsv(img: Tensor) -> Tensor:
    r, g, b = img.unbind(1)
    maxc, minc = img.max(1).values, img.min(1).values
    delta = maxc - minc
    s = delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc))
    d = torch.where(delta > 0, delta, torch.ones_like(delta))
    rc, gc, bc = (maxc - r) / d, (maxc - g) / d, (maxc - b) / d
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    return torch.stack([h, s, maxc], dim=1)


def _hsv_to_rgb(hsv: Tensor) -> Tensor:
    # Closed form: channel_n = v - v*s*clamp(min(k, 4-k), 0, 1), k = (n + 6h) mod 6, n = 5, 3, 1.
    h, s, v = hsv.unbind(1)
    out = []
    for n in (5.0, 3.0, 1.0):
        k = (n + 6.0 * h) % 6.0
        out.append(v - v * s * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0))
    return torch.stack(out, dim=1)


class ImageAugment(nn.Module):
    """Train-time augmentation on float images (B, 3, H, W) in [0, 1]; identity in eval mode.

    1. Colour jitter with ONE draw of (brightness, contrast, saturation, hue) factors and one
       random order per call, shared by the batch; each sample independently keeps the jittered
       image with probability ``1 - epsilon`` (spec §2.4: epsilon = 0.1).
    2. Replicate-pad ``pad`` px and crop back to H x W at a per-sample random offset.
    Uses the global torch RNG (seed it for reproducibility).
    """

    def __init__(self, brightness=0.3, contrast=0.3, saturation=0.3, hue=0.3, epsilon=0.1, pad=2):
        super().__init__()
        self.brightness, self.contrast, self.saturation, self.hue = (
            brightness, contrast, saturation, hue
        )
        self.epsilon = epsilon
        self.pad = pad

    def _jitter(self, img: Tensor) -> Tensor:
        dev = img.device

        def factor(amount):  # multiplicative factor ~ U[1 - a, 1 + a], one per call
            return float(torch.empty(1).uniform_(max(0.0, 1 - amount), 1 + amount))

        out = img
        for op in torch.randperm(4).tolist():  # torchvision applies the four ops in random order
            if op == 0 and self.brightness > 0:
                out = (out * factor(self.brightness)).clamp(0, 1)
            elif op == 1 and self.contrast > 0:
                c = factor(self.contrast)
                mean = _gray(out).mean(dim=(1, 2, 3), keepdim=True)
                out = (c * out + (1 - c) * mean).clamp(0, 1)
            elif op == 2 and self.saturation > 0:
                s = factor(self.saturation)
                out = (s * out + (1 - s) * _gray(out)).clamp(0, 1)
            elif op == 3 and self.hue > 0:
                shift = float(torch.empty(1).uniform_(-self.hue, self.hue))
                hsv = _rgb_to_hsv(out)
                hsv = torch.stack([(hsv[:, 0] + shift) % 1.0, hsv[:, 1], hsv[:, 2]], dim=1)
                out = _hsv_to_rgb(hsv).clamp(0, 1)
        keep = (torch.rand(img.shape[0], device=dev) >= self.epsilon).view(-1, 1, 1, 1)
        return torch.where(keep, out, img)

    def _random_crop(self, img: Tensor) -> Tensor:
        b, _, h, w = img.shape
        p = self.pad
        padded = F.pad(img, (p, p, p, p), mode="replicate")
        oy = torch.randint(0, 2 * p + 1, (b, 1), device=img.device)
        ox = torch.randint(0, 2 * p + 1, (b, 1), device=img.device)
        iy = oy + torch.arange(h, device=img.device)  # (B, H)
        ix = ox + torch.arange(w, device=img.device)  # (B, W)
        bi = torch.arange(b, device=img.device)[:, None, None]
        # Advanced indexing puts the broadcast (B, H, W) dims first, channels last.
        return padded[bi, :, iy[:, :, None], ix[:, None, :]].permute(0, 3, 1, 2)

    def forward(self, img: Tensor) -> Tensor:
        if not self.training:
            return img
        return self._random_crop(self._jitter(img))


# ---------------------------------------------------------------- fused observation encoder


def preprocess_image(img: Tensor) -> Tensor:
    """uint8 or float image (B, 3, H, W) (or (B, H, W, 3)) -> float (B, 3, <=128, <=128) in [0,1].

    Spec §2.4: /255 for uint8, clip, bilinear resize when larger than 128 px.
    """
    if img.ndim != 4:
        raise ValueError(f"image must be 4-D (B, 3, H, W), got shape {tuple(img.shape)}")
    if img.shape[1] != 3 and img.shape[-1] == 3:
        img = img.permute(0, 3, 1, 2)
    img = img.float() / 255.0 if img.dtype == torch.uint8 else img.float()
    img = img.clamp(0.0, 1.0)
    if img.shape[-1] > IMAGE_SIZE or img.shape[-2] > IMAGE_SIZE:
        img = F.interpolate(img, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear",
                            align_corners=False)
    return img


class ObsEncoder(nn.Module):
    """Observation + task -> context (B, 2, d_model) = [task token, obs token] (spec §4.1).

    Per camera: ImageEncoder -> image_width; per low-dim key: Linear(dim -> lowdim_width);
    concatenation (cameras in ``rgb_keys`` order, then low-dim keys in dict order) -> Linear ->
    one observation token. Task (spec §2.3): ids index a vocabulary of ``n_tasks`` tasks; the
    token is Embedding(n_tasks, d) (MetaWorld's one-hot), or, with ``task_emb_dim``, a frozen
    table of language embeddings (n_tasks, task_emb_dim) -> Linear(task_emb_dim, d). The table
    is a buffer, so a checkpoint carries the embeddings its task ids refer to.
    """

    def __init__(
        self,
        lowdim_dims: dict[str, int],
        rgb_keys: list[str],
        d_model: int = 384,
        lowdim_width: int = 128,
        image_width: int = 256,
        n_tasks: int = 50,
        task_emb_dim: int | None = None,
        augment: bool = True,
        task_names: list[str] | None = None,
    ):
        """task_names: the vocabulary (id -> task name) when known; policies map env task
        names to ids with it, so the ids of a two-suite vocabulary (pretraining + few-shot
        target) cannot be confused with a single suite's indices."""
        super().__init__()
        if task_names is not None and len(task_names) != n_tasks:
            raise ValueError(f"{len(task_names)} task_names for n_tasks={n_tasks}")
        if n_tasks < 1 or (task_emb_dim is not None and task_emb_dim < 1):
            raise ValueError(f"n_tasks ({n_tasks}) and task_emb_dim ({task_emb_dim}) must be >= 1")
        if not lowdim_dims and not rgb_keys:
            raise ValueError("ObsEncoder needs at least one low-dim or rgb key")
        for k in list(lowdim_dims) + list(rgb_keys):
            if "." in k:
                raise ValueError(f"observation key {k!r} must not contain '.'")
        self.arch = {
            "lowdim_dims": dict(lowdim_dims), "rgb_keys": list(rgb_keys), "d_model": d_model,
            "lowdim_width": lowdim_width, "image_width": image_width, "n_tasks": n_tasks,
            "task_emb_dim": task_emb_dim, "augment": augment,
            "task_names": None if task_names is None else list(task_names),
        }
        self.task_names = None if task_names is None else list(task_names)
        self.d_model = d_model
        self.lowdim_dims = dict(lowdim_dims)
        self.rgb_keys = list(rgb_keys)
        self.image_encoders = nn.ModuleDict({k: ImageEncoder(image_width) for k in self.rgb_keys})
        self.lowdim_encoders = nn.ModuleDict(
            {k: nn.Linear(dim, lowdim_width) for k, dim in self.lowdim_dims.items()}
        )
        fused = image_width * len(self.rgb_keys) + lowdim_width * len(self.lowdim_dims)
        self.fuse = nn.Linear(fused, d_model)
        self.augment = ImageAugment() if augment else nn.Identity()
        self.n_tasks = n_tasks
        if task_emb_dim is None:
            self.task_encoder: nn.Module = nn.Embedding(n_tasks, d_model)
        else:
            self.task_encoder = nn.Linear(task_emb_dim, d_model)
            self.register_buffer("task_embeddings", torch.zeros(n_tasks, task_emb_dim))

    def set_task_embeddings(self, table: Tensor) -> None:
        """Install the (n_tasks, task_emb_dim) language embeddings of the task vocabulary."""
        if not hasattr(self, "task_embeddings"):
            raise TypeError("this ObsEncoder has one-hot task ids (no task_emb_dim)")
        if tuple(table.shape) != tuple(self.task_embeddings.shape):
            raise ValueError(f"task embeddings of shape {tuple(table.shape)}, expected "
                             f"{tuple(self.task_embeddings.shape)}")
        self.task_embeddings.copy_(table)

    def encode_task(self, task: Tensor) -> Tensor:
        """task ids (B,) long (or, with task_emb_dim, embeddings (B, D) float) -> (B, d)."""
        if task.is_floating_point():
            if isinstance(self.task_encoder, nn.Embedding):
                raise TypeError("this ObsEncoder takes integer task ids, got a float tensor")
            return self.task_encoder(task.float())
        ids = task.long().reshape(-1)
        if ids.numel() and not 0 <= int(ids.min()) <= int(ids.max()) < self.n_tasks:
            raise IndexError(f"task id out of range [0, {self.n_tasks}): {ids.tolist()}")
        if isinstance(self.task_encoder, nn.Embedding):
            return self.task_encoder(ids)
        return self.task_encoder(self.task_embeddings[ids])

    def forward(self, obs: dict[str, Tensor], task: Tensor) -> Tensor:
        """obs {key: (B, ...)}, task (B,) or (B, D) -> context (B, 2, d_model)."""
        feats = []
        for k in self.rgb_keys:
            if k not in obs:
                raise KeyError(f"observation key {k!r} (rgb) missing; got {sorted(obs)}")
            img = self.augment(preprocess_image(obs[k]))
            feats.append(self.image_encoders[k](img))
        for k, dim in self.lowdim_dims.items():
            if k not in obs:
                raise KeyError(f"observation key {k!r} (low-dim) missing; got {sorted(obs)}")
            x = obs[k].float().reshape(obs[k].shape[0], -1)
            if x.shape[1] != dim:
                raise ValueError(f"obs[{k!r}] has {x.shape[1]} features, expected {dim}")
            feats.append(self.lowdim_encoders[k](x))
        obs_tok = self.fuse(torch.cat(feats, dim=-1))
        return torch.stack([self.encode_task(task), obs_tok], dim=1)
