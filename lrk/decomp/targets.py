"""The one target selector of every method: ``targets`` / ``skip`` glob patterns over module names.

A method names the kind of module it replaces (``kinds``: Linear/Conv layers for the weight methods, attention
modules for the attention methods) and, for ``targets: null``, which of them it takes by default. Every
pattern must match a module of that kind (a pattern that matches nothing is an error, not a silent no-op),
every matched module must be supported, and ``skip`` must not remove them all.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from lrk.errors import LrkConfigError
from lrk.layers.base import describe

#: the Linear/Conv layers a weight method may be pointed at
WEIGHT_LAYERS = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)


@dataclass(frozen=True)
class TargetSelector:
    """What a method replaces. ``kinds``: the module classes a pattern may select; ``label``: their name in
    messages ("Linear/Conv layers", "attention modules"); ``supported``: what the method supports, for messages;
    ``is_default(name, module)``: whether ``targets: null`` takes a module; ``support_error(name, module)``: why a
    module cannot be replaced (None when it can); ``none_found``: the message when the model has no module of
    ``kinds`` at all (None: the default-target message)."""

    method: str
    kinds: tuple[type[nn.Module], ...]
    label: str
    supported: str
    is_default: Callable[[str, nn.Module], bool]
    support_error: Callable[[str, nn.Module], str | None]
    none_found: str | None = None

    def select(
        self, model: nn.Module, targets: Sequence[str] | None, skip: Sequence[str]
    ) -> list[tuple[str, nn.Module]]:
        """The modules to replace, in module order (raises :class:`LrkConfigError` before anything changes)."""
        modules = [(n, m) for n, m in model.named_modules() if n]
        candidates = [(n, m) for n, m in modules if isinstance(m, self.kinds)]
        if not candidates and self.none_found is not None:
            raise LrkConfigError(self.none_found)
        sample = ", ".join(n for n, _ in candidates)[:300]
        if targets is None:
            chosen = [
                (n, m) for n, m in candidates if self.support_error(n, m) is None and self.is_default(n, m)
            ]
            if not chosen:
                raise LrkConfigError(
                    f"decomp={self.method} found no layer to decompose by default in this model ({self.supported}); "
                    f"set decomp.targets to glob patterns over its layers, e.g. {sample[:120]}"
                )
        else:
            picked: set[str] = set()
            for pattern in targets:
                hits = [(n, m) for n, m in modules if fnmatch.fnmatchcase(n, pattern)]
                kept = [(n, m) for n, m in hits if isinstance(m, self.kinds)]
                if not kept:
                    what = f"only {', '.join(n for n, _ in hits[:5])}" if hits else "no module at all"
                    raise LrkConfigError(
                        f"decomp.targets pattern '{pattern}' matches no {self.label} ({what}): decomp={self.method} "
                        f"replaces {self.label}, whose names look like {sample}"
                    )
                for n, m in kept:
                    reason = self.support_error(n, m)
                    if reason is not None:
                        raise LrkConfigError(
                            f"decomp={self.method} cannot decompose layer '{n}' ({describe(m)}): {reason}; "
                            f"decomp={self.method} supports {self.supported}"
                        )
                    picked.add(n)
            chosen = [(n, m) for n, m in candidates if n in picked]
        names = [n for n, _ in modules]
        for pattern in skip:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                raise LrkConfigError(
                    f"decomp.skip pattern '{pattern}' matches no module of the model; {self.label} are named like "
                    f"{sample}"
                )
        chosen = [(n, m) for n, m in chosen if not any(fnmatch.fnmatchcase(n, p) for p in skip)]
        if not chosen:
            raise LrkConfigError(f"decomp={self.method}: decomp.skip={list(skip)} removes every target")
        return chosen
