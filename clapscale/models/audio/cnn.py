"""PANNs CNNs (Kong et al. 2020) as CLAP audio towers: CNN14, CNN10, CNN6 and a CPU-sized ``tiny``.

Layout as in PANNs and LAION-CLAP (parameter names too, so their checkpoints map 1:1): ``bn0`` over
the mel bins, conv blocks with 2x2 average pooling and dropout, mean over frequency, max + mean over
time, ``fc1`` with ReLU -> embedding (2048 for CNN14). ``fc_audioset`` (527 AudioSet classes) exists
only when asked for (loading a PANNs checkpoint, counting parameters as PANNs report them); CLAP does
not use it.

Fusion (LAION-CLAP's 2-D variant): the global view goes through ``conv_block1``; each local chunk
goes through ``mel_conv2d`` (5x5 conv, stride 3x the block's time pooling) so the three chunks
concatenated in time match the global map's size; ``fusion_model`` merges them for longer samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from clapscale.models.audio.base import AudioTower, check_mel
from clapscale.models.fusion import build_fusion, fuse_longer, local_chunks, longer_index


@dataclass(frozen=True)
class CnnSpec:
    channels: tuple[int, ...]  # output channels per conv block
    kernel: int  # 3: two 3x3 convs per block (CNN10/14); 5: one 5x5 conv (CNN6)
    last_pool: tuple[int, int]  # pooling of the last block (CNN14 keeps 1x1)
    stem_pool: tuple[int, int]  # average pooling of the input before block 1 (tiny only)
    block_dropout: float
    embed_dropout: float


CNN_SPECS: dict[str, CnnSpec] = {
    "14": CnnSpec((64, 128, 256, 512, 1024, 2048), 3, (1, 1), (1, 1), 0.2, 0.5),
    "10": CnnSpec((64, 128, 256, 512), 3, (2, 2), (1, 1), 0.2, 0.5),
    "6": CnnSpec((64, 128, 256, 512), 5, (2, 2), (1, 1), 0.2, 0.5),
    # ~0.3M parameters: a 2-rank CPU demo trains a batch of 16 x 10 s clips in well under a second.
    "tiny": CnnSpec((16, 32, 64, 128), 3, (2, 2), (2, 2), 0.1, 0.1),
}


class ConvBlock(nn.Module):
    """Two 3x3 conv-BN-ReLU (``kernel=3``) or one 5x5 (``kernel=5``), then average pooling."""

    def __init__(self, cin: int, cout: int, kernel: int):
        super().__init__()
        self.double = kernel == 3
        self.conv1 = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        if self.double:
            self.conv2 = nn.Conv2d(cout, cout, kernel, padding=kernel // 2, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)

    channels_last = False  # set by PannCnn.set_channels_last

    def forward(self, x: torch.Tensor, pool: tuple[int, int]) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(self._format(x))))
        if self.double:
            x = F.relu(self.bn2(self.conv2(self._format(x))))
        return F.avg_pool2d(x, pool) if pool != (1, 1) else x

    def _format(self, x: torch.Tensor) -> torch.Tensor:
        # A convolution follows its input's memory format, but a 1-channel input (block 1's) is
        # ambiguous and gives contiguous output: convert before each convolution (a no-op once NHWC).
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


class PannCnn(AudioTower):
    """``forward(mel (B, 1|4, T, n_mels), is_longer (B,)) -> (B, channels[-1])``."""

    supports_fusion = True

    def __init__(
        self,
        spec: CnnSpec,
        n_mels: int = 64,
        fusion: str = "none",
        audioset_head: bool = False,
    ):
        super().__init__()
        self.spec = spec
        self.n_mels = n_mels
        self.out_dim = spec.channels[-1]
        self.grad_checkpointing = False
        self.channels_last = False
        self.bn0 = nn.BatchNorm2d(n_mels)
        cin = 1
        for i, cout in enumerate(spec.channels):
            setattr(self, f"conv_block{i + 1}", ConvBlock(cin, cout, spec.kernel))
            cin = cout
        self.fc1 = nn.Linear(cin, cin)
        if audioset_head:
            self.fc_audioset = nn.Linear(cin, 527)
        self.fusion = fusion
        if fusion != "none":
            c1 = spec.channels[0]
            # Each local chunk is a full 10 s; three of them side by side in time must fit the global
            # map after block 1, so the local conv strides 3x further in time than block 1 pools.
            self.mel_conv2d = nn.Sequential(
                nn.Conv2d(1, c1, kernel_size=5, stride=(6, 2), padding=2),
                nn.BatchNorm2d(c1),
                nn.ReLU(inplace=True),
            )
            self.fusion_model = build_fusion(fusion, c1)

    def _pools(self) -> list[tuple[int, int]]:
        n = len(self.spec.channels)
        return [(2, 2)] * (n - 1) + [self.spec.last_pool]

    def _block(self, i: int, x: torch.Tensor, pool: tuple[int, int]) -> torch.Tensor:
        """Conv block ``i`` (0-based), without the dropout that follows it (see ``forward``)."""
        block = getattr(self, f"conv_block{i + 1}")
        if self.grad_checkpointing and self.training and x.requires_grad:
            return checkpoint(block, x, pool, use_reentrant=False)
        return block(x, pool)

    def forward(self, mel: torch.Tensor, is_longer: torch.Tensor | None = None) -> torch.Tensor:
        check_mel(mel, self.n_mels, "cnn audio tower")
        # bn0 normalises each mel bin (bins are BatchNorm channels), for all 4 fusion views alike.
        x = self.bn0(mel.transpose(1, 3)).transpose(1, 3)
        if self.spec.stem_pool != (1, 1):
            x = F.avg_pool2d(x, self.spec.stem_pool)
        if self.channels_last:
            # Convolutions follow their input's memory format (DeepSpeed may flatten the weights).
            x = x.contiguous(memory_format=torch.channels_last)
        pools = self._pools()
        h = self._block(0, x[:, :1], pools[0])
        if self.fusion != "none":
            idx = longer_index(mel, is_longer)
            local = local_chunks(x, idx)  # (k, 3, T', F')
            k = local.shape[0]
            loc = self.mel_conv2d(local.reshape(k * 3, 1, *local.shape[2:]))
            # (k*3, C, t, f) -> (k, C, 3t, f): the three chunks side by side in time.
            loc = loc.reshape(k, 3, *loc.shape[1:]).permute(0, 2, 1, 3, 4).flatten(2, 3)
            th = h.shape[2]
            loc = F.pad(loc, (0, 0, 0, th - loc.shape[2])) if loc.shape[2] < th else loc[:, :, :th]
            h = fuse_longer(self.fusion_model, h, loc, idx)
        # Dropout follows every block, as in PANNs; with fusion it follows the fused map (LAION-CLAP's
        # Cnn14 order), so the local branch's features are dropped out like the global ones.
        h = F.dropout(h, self.spec.block_dropout, self.training)
        for i in range(1, len(self.spec.channels)):
            h = F.dropout(self._block(i, h, pools[i]), self.spec.block_dropout, self.training)
        h = h.mean(dim=3)  # (B, C, T'')
        h = h.amax(dim=2) + h.mean(dim=2)
        h = F.dropout(h, self.spec.embed_dropout, self.training)
        h = F.relu(self.fc1(h))
        return F.dropout(h, self.spec.embed_dropout, self.training)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def set_channels_last(self, enable: bool = True) -> None:
        """Run the convolutions in channels_last (NHWC) memory format, which cuDNN's bf16 tensor-core
        kernels prefer; the outputs are the same up to float summation order. Only the activations
        change format (a convolution follows its input's): the weights stay contiguous, because
        DeepSpeed flattens them by viewing their storage (channels_last bf16 weights made ZeRO's
        flattening fail: "stride(-1) must be 1 to view BFloat16 as Byte")."""
        self.channels_last = enable
        for block in self.modules():
            if isinstance(block, ConvBlock):
                block.channels_last = enable

    def load_pretrained(self, path: str) -> None:
        load_panns_weights(self, path)


def build_cnn(
    size: str, fusion: str = "none", n_mels: int = 64, n_frames: int = 1001, audioset_head: bool = False
) -> PannCnn:
    """A PANNs CNN of ``size`` in ``CNN_SPECS`` (``14`` | ``10`` | ``6`` | ``tiny``).

    ``audioset_head`` adds PANNs' 527-class ``fc_audioset`` (unused by CLAP; for PANNs checkpoints and
    parameter counts as PANNs report them). Any ``n_frames`` works (global pooling over time).
    """
    return PannCnn(CNN_SPECS[str(size)], n_mels=n_mels, fusion=fusion, audioset_head=audioset_head)


def load_panns_weights(tower: PannCnn, path: str) -> None:
    """Initialise ``tower`` from a PANNs (or LAION-CLAP audio-branch) CNN checkpoint.

    PANNs' STFT / mel buffers and the AudioSet head are skipped (our front end computes the mel);
    fusion modules, which PANNs lack, keep their fresh init. Everything else must match in name and
    shape, otherwise ``CheckpointMismatchError`` names the tensors.
    """
    from clapscale.models.checkpoint import CheckpointMismatchError, check_shapes, read_state_dict

    sd = read_state_dict(path)
    sd = {k.removeprefix("module.").removeprefix("audio_branch."): v for k, v in sd.items()}
    skip = ("spectrogram_extractor.", "logmel_extractor.", "fc_audioset.")
    own = tower.state_dict()
    sd = {k: v for k, v in sd.items() if not k.startswith(skip) or k in own}
    fresh = ("mel_conv2d.", "fusion_model.")
    missing = sorted(k for k in own if k not in sd and not k.startswith(fresh))
    if missing:
        raise CheckpointMismatchError(
            f"model.audio.pretrained={path!r} is not a PANNs CNN of this size: missing {missing[:8]}"
        )
    check_shapes(tower, sd, where=f"model.audio.pretrained={path!r}", strict=False)
    unexpected = sorted(set(sd) - set(own))
    if unexpected:
        raise CheckpointMismatchError(
            f"model.audio.pretrained={path!r} has tensors this CNN lacks: {unexpected[:8]}"
        )
    tower.load_state_dict(sd, strict=False)
