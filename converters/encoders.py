"""Which ResNet to take from a checkpoint holding two: the convention of the project that saved it.

Self-supervised training keeps two copies of its encoder in one file (a query and a momentum
key encoder, an online and a target network, a student and a teacher). Each project's own
linear-evaluation code loads one of them; where the prefixes say which project wrote the file,
:func:`choose` takes that one and says why. Anywhere else two ResNets stay a refusal naming both
(:func:`ddscore_jax.converters.layouts.find_resnet`): nothing else decides which one is meant.

Prefixes are ``<base><role>.<tail>``: the same base and tail for both encoders, the roles a
project's pair. The conventions, each from the project's own evaluation code:

- MoCo v1/v2 (facebookresearch/moco): ``encoder_q``/``encoder_k``; ``main_lincls.py`` keeps
  ``module.encoder_q.*`` without its ``fc`` (the 128-d embedding, or the ``--mlp`` head).
- MoCo v3 (facebookresearch/moco-v3): ``base_encoder``/``momentum_encoder``; ``main_lincls.py``
  keeps ``module.base_encoder.*`` without its ``fc`` (the projection MLP).
- BYOL (lucidrains/byol-pytorch): ``online_encoder``/``target_encoder``, each ``NetWrapper.net``;
  the README saves the online network (the ``net`` given to ``BYOL``), whose ``fc`` BYOL never
  trains (the representation is taken at ``avgpool``).
- DINO (facebookresearch/dino): ``teacher``/``student``, each a ``MultiCropWrapper`` whose
  ResNet is ``backbone`` (with ``fc`` replaced by an identity); ``eval_linear.py`` loads
  ``--checkpoint_key teacher`` by default. Only a ``backbone`` tail counts: a plain
  ``teacher.``/``student.`` distillation file is not DINO's and stays refused.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Convention:
    """One project's pair of encoder roles and the one its evaluation loads."""

    project: str
    keep: str  # the role kept
    drop: str  # the role left out
    why: str  # for the warning: which of its scripts loads ``keep``
    tail: re.Pattern[str] = re.compile(r"")  # what must follow the role (DINO: its backbone)


CONVENTIONS = (
    Convention("MoCo v1/v2", "encoder_q", "encoder_k",
               "the query encoder, which MoCo's main_lincls.py loads"),
    Convention("MoCo v3", "base_encoder", "momentum_encoder",
               "the base encoder, which MoCo v3's main_lincls.py loads"),
    Convention("BYOL", "online_encoder", "target_encoder",
               "the online network, which byol-pytorch saves as the trained net"),
    Convention("DINO", "teacher", "student",
               "the teacher, which DINO's eval_linear.py loads by default",
               re.compile(r"^(module\.)?backbone\.$")),
)


@dataclass(frozen=True)
class Choice:
    """The encoder a convention picked: its prefix, the prefixes left out, and the reason."""

    prefix: str
    dropped: tuple[str, ...]
    note: str
    aliases: tuple[str, ...] = ()  # the kept encoder under other names (BYOL's ``net.``)


def choose(prefixes: Sequence[str], tensors: Mapping[str, Any]) -> Choice | None:
    """The ResNet prefix that the saving project's convention picks among ``prefixes`` (each a
    complete ResNet in ``tensors``), or None where no convention decides.

    Any further prefix must be a copy of one of the pair (BYOL's ``net.`` is also
    ``online_encoder.net.``: one module under two names), told by equal tensors.
    """
    for c in CONVENTIONS:
        roles: dict[str, list[tuple[str, str, str]]] = {c.keep: [], c.drop: []}
        for p in prefixes:
            m = re.fullmatch(rf"(?P<base>(?:.*\.)?)(?P<role>{c.keep}|{c.drop})\.(?P<tail>.*)", p)
            if m is not None and c.tail.search(m["tail"]):
                roles[m["role"]].append((p, m["base"], m["tail"]))
        if len(roles[c.keep]) != 1 or len(roles[c.drop]) != 1:
            continue
        (keep, *where_keep), (drop, *where_drop) = roles[c.keep][0], roles[c.drop][0]
        if where_keep != where_drop:
            continue
        rest = [p for p in prefixes if p not in (keep, drop)]
        aliases = tuple(p for p in rest if _same_tensors(tensors, p, keep))
        copies = tuple(p for p in rest if p not in aliases and _same_tensors(tensors, p, drop))
        if len(aliases) + len(copies) == len(rest):
            return Choice(keep, (drop, *copies), f"a {c.project} checkpoint: took {c.why} "
                          f"('{keep}*'), not '{drop}*'", aliases)
    return None


def _same_tensors(tensors: Mapping[str, Any], p: str, q: str) -> bool:
    """True when the ResNets under prefixes ``p`` and ``q`` have the same names and values."""
    a = {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}
    b = {k[len(q):]: v for k, v in tensors.items() if k.startswith(q)}
    if a.keys() != b.keys():
        return False
    return all(_equal(a[k], b[k]) for k in a)


def _equal(x: Any, y: Any) -> bool:
    if x is y:
        return True
    if tuple(x.shape) != tuple(y.shape):
        return False
    if hasattr(x, "equal") and hasattr(y, "equal"):  # torch tensors
        return bool(x.equal(y))
    import numpy as np

    return bool(np.array_equal(np.asarray(x), np.asarray(y)))
