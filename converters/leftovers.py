"""What a checkpoint holds besides its ResNet: what is left out, and the one warning line naming it.

A self-supervised or multi-head checkpoint keeps heads beside its backbone (a ``projector``, a
``projection_head``, ``prototypes``, a ``predictor``, an MLP in place of ``fc``), a second
encoder, a ``queue``. The backbone is imported and these are left out, counted and named in one
line; nothing under a ResNet module's own name is ever dropped (an SE layer in a block stays a
refusal, :mod:`.arch`). Training state (optimizer, scheduler, loss-scaler state, a scalar such as
``best_acc1``) is not the network and is left out without a word, as it always was.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

# Top-level keys of training-state dicts that torch, Lightning, apex and the projects' own
# save_checkpoint functions write beside the model.
TRAINING_STATE = frozenset({
    "optimizer", "optimizer_states", "optimizer_state_dict", "opt", "lr_scheduler",
    "lr_schedulers", "scheduler", "scaler", "fp16_scaler", "amp", "loops", "callbacks",
})

# The top-level modules of a torchvision/timm ResNet (canonical names). A canonical key under
# any other first name is beside the backbone: a head, or state of the training method.
RESNET_MODULES = frozenset({"conv1", "bn1", "act1", "maxpool", "layer1", "layer2", "layer3",
                            "layer4", "global_pool", "avgpool", "fc"})
# Names that could be part of a network's forward (a stem, an extra stage): never set aside, so
# that such a network is refused by the layer check rather than imported without that part.
_MAYBE_FORWARD = re.compile(r"^(conv|bn|norm|act|stem|pool|layer|stage|downsample)\w*$")

_SHOWN = 6  # groups named in the warning; the rest are counted


def beside_backbone(sd: Mapping[str, Any], drop_fc: bool = False
                    ) -> tuple[dict[str, Any], list[str]]:
    """``sd`` (canonical names) split into the ResNet's tensors and the keys beside it: heads
    beside the backbone, and an ``fc`` that is not one Linear layer (``fc.0``/``fc.2`` MLPs, MoCo
    v3's ``fc.0``..``fc.4``), so that the model imports without a classifier. ``drop_fc``: the
    ``fc`` is a projection whatever its shape (the saving project's convention says so)."""
    keep, out = {}, []
    mlp_fc = drop_fc or any(k.startswith("fc.") and k not in ("fc.weight", "fc.bias")
                            for k in sd)
    for k, v in sd.items():
        first = k.split(".", 1)[0]
        if (first == "fc" and mlp_fc) or (first not in RESNET_MODULES
                                          and not _MAYBE_FORWARD.match(first)):
            out.append(k)
        else:
            keep[k] = v
    return keep, out


def outside(tensors: Mapping[str, Any], taken: tuple[str, ...]) -> list[str]:
    """The model tensors of a flat checkpoint under none of the prefixes ``taken``: training
    state and scalars aside."""
    return [k for k, v in tensors.items()
            if not k.startswith(taken) and k.split(".", 1)[0] not in TRAINING_STATE
            and not k.endswith(".num_batches_tracked")
            and not ("." not in k and len(getattr(v, "shape", ())) == 0)]


def warning(source: str, names: Iterable[str], chose: str | None = None,
            whole: tuple[str, ...] = ()) -> str | None:
    """The one line saying what was left out (None when nothing was): ``source: left out 6
    tensors outside the ResNet: projector.* (4), queue``, after the encoder choice if any.
    ``whole``: prefixes of encoders left out, each named as one group."""
    names = list(names)
    if not names and not chose:
        return None
    parts = [chose] if chose else []
    if names:
        groups: dict[str, list[str]] = {}
        for n in names:
            g = next((w[:-1] for w in whole if n.startswith(w)), None) or _group(n)
            groups.setdefault(g, []).append(n)
        # A group of one tensor is shown as that tensor's name.
        shown = [f"{g}.* ({len(m)})" if len(m) > 1 else m[0]
                 for g, m in list(groups.items())[:_SHOWN]]
        more = len(groups) - _SHOWN
        parts.append(f"left out {len(names)} tensor{'s' if len(names) != 1 else ''} outside the "
                     f"ResNet: {', '.join(shown)}" + (f" and {more} more" if more > 0 else ""))
    return f"{source}: {'; '.join(parts)}"


def _group(name: str) -> str:
    """``module.projection_head.0.weight`` -> ``module.projection_head``: the module a tensor
    belongs to, up to its first numbered child; a bare buffer (``module.queue``) is itself."""
    parts = name.split(".")
    if len(parts) == 1:
        return name
    head = parts[:-1]
    for i, p in enumerate(head):
        if p.isdigit() and i > 0:
            head = head[:i]
            break
    if head[-1] in ("module", "state_dict", "model"):  # a buffer right in the container
        return name
    return ".".join(head)
