"""The calibration profile: safetensors arrays plus a JSON header, written atomically and checked on load.

Arrays (N samples, L layers, H_kv KV heads, P policies, G budgets):
  mass_lost (N, L, H_kv, P, G), out_err (N, L, H_kv, P, G), signal.<name> (N, L, H_kv), context_tokens (N,);
  with `calibrate --layer-kl` also layer_kl (N, L, 1, P, G): KL to the full cache with only that layer compressed,
  and layer_nll (N, L, 1, P, G): the rise of the reference answer's negative log-likelihood in the same probe;
  with `calibrate --around B1,B2,...` also around_kl (N, L, A, P, G): KL with every other layer at the uniform
  background of budget B_a (header "around": budget and policy of each), and around_base_kl (N, A): the
  background's own KL; with `calibrate --head-kl` head_kl (N, L, H_kv, P, G): KL with only that KV head
  compressed, and with `--head-fisher` head_fisher (N, L, H_kv, P, G): the same estimated to second order from
  answer gradients, probed exactly where the estimate is large (calibration/head_fisher.py), and
  head_fisher_probed (N, L, H_kv, P, G) uint8: 1 where the cell holds the probe's KL, 0 where the estimate.
Sliding-window layers hold NaN: the architecture fixes their cache and no plan touches them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from polykv_search.errors import ProfileError
from polykv_search.calibration.header import ProfileHeader
from polykv_search.io import write_atomic
from polykv_search.models.info import ModelInfo
from polykv_search.plan import LayerPlan, Plan, SearchInfo, uniform_plan
from polykv_search.plan.names import COST_NAMES, WEIGHTINGS, CostKind

logger = logging.getLogger(__name__)

PROFILE_FORMAT = "polykv-profile"
PROFILE_VERSION = 2  # bump when arrays or header fields change meaning; 2: "around" backgrounds are plans
READABLE_VERSIONS = (1, PROFILE_VERSION)  # version 1 headers are upgraded on load
HEADER_KEY = "polykv_profile"
CHECKSUM_KEY = "polykv_sha256"  # of the tensors (names, dtypes, shapes, bytes) and the header: required, verified
REQUIRED_HEADER = ("model", "policies", "budgets", "samples")
# Where each cost lives (sliding-window layers hold NaN; every other value must be finite and in its range):
# mass_lost is a share of attention mass; the KLs are >= 0 up to float rounding; an NLL rise may be negative.
COST_RANGES: dict[str, tuple[float, float]] = {
    "mass_lost": (-1e-4, 1 + 1e-4), "out_err": (0.0, math.inf), "layer_kl": (-1e-3, math.inf),
    "layer_nll": (-math.inf, math.inf), "around_kl": (-1e-3, math.inf), "around_base_kl": (-1e-3, math.inf),
    "head_kl": (-1e-3, math.inf), "head_fisher": (0.0, math.inf),
}
COST_KINDS = ("mass_lost", "out_err")  # in every profile
OPTIONAL_COST_KINDS = ("layer_kl", "layer_nll")  # measured by `calibrate --layer-kl` only
AROUND_KL = "around_kl"  # measured by `calibrate --around` only; a cost at the measured budgets only
AROUND_BASE = "around_base_kl"
HEAD_KL = "head_kl"  # measured by `calibrate --head-kl` only: one KV head compressed at a time, (N, L, H_kv, P, G)
HEAD_FISHER = "head_fisher"  # `calibrate --head-fisher` only: head_kl's second-order estimate, (N, L, H_kv, P, G)
HEAD_FISHER_PROBED = "head_fisher_probed"  # which head_fisher cells were probed exactly, (N, L, H_kv, P, G) uint8
HEAD_COST_KINDS = (HEAD_KL, HEAD_FISHER)  # costs per KV head: `optimize` makes per-head plans from them
ALL_COST_KINDS: tuple[CostKind, ...] = COST_NAMES  # (*COST_KINDS, *OPTIONAL_COST_KINDS, AROUND_KL, *HEAD_COST_KINDS)
HEAD_MODE_FLAGS = {HEAD_KL: "--head-kl", HEAD_FISHER: "--head-fisher"}


@dataclass
class Profile:
    header: dict[str, Any]
    arrays: dict[str, torch.Tensor]

    # -- views -------------------------------------------------------------------------------------
    @property
    def meta(self) -> ProfileHeader:
        """The header read as types (`header` is its JSON, as the file stores it)."""
        return ProfileHeader.from_dict(self.header)

    @property
    def model(self) -> ModelInfo:
        return ModelInfo.from_dict(self.header["model"])

    @property
    def policies(self) -> list[str]:
        return [p["name"] for p in self.header["policies"]]

    @property
    def budgets(self) -> list[int]:
        return list(self.header["budgets"])

    @property
    def num_samples(self) -> int:
        return int(self.arrays["mass_lost"].shape[0])

    @property
    def around_budgets(self) -> list[int]:
        """The target budgets whose operating points `calibrate --around` measured (empty without it)."""
        return [int(a["budget"]) for a in self.header.get("around", [])] if AROUND_KL in self.arrays else []

    def layer_costs(self, kind: str = "mass_lost", weighting: str = "mean", budget: float | None = None,
                    ) -> torch.Tensor:
        """Cost per (layer, policy, budget) averaged over samples and KV heads: (L, P, G).

        weighting "mean": the plain mean, so samples whose answers are long or hard (large costs everywhere) weigh
        most; "equal": each sample's costs are first divided by its own scale (its mean cost over compressible
        layers and policies at the lowest budget level), so every sample, and so every task, counts the same.
        "around_kl" needs the target `budget` (one of `around_budgets`): the share of the output distribution lost
        against that budget's background, exp(-KL_background) - exp(-KL_probe) (negative where a layer gains).
        """
        if kind in OPTIONAL_COST_KINDS and kind not in self.arrays:
            raise ProfileError(f"this profile has no {kind} costs; re-run calibrate with --layer-kl to measure them")
        if kind == AROUND_KL and kind not in self.arrays:
            raise ProfileError("this profile has no around_kl costs; re-run calibrate with --around BUDGETS")
        if kind in HEAD_COST_KINDS:
            raise ProfileError(f"{kind} is a cost per KV head, not per layer: `optimize --cost {kind}` allocates "
                               "per KV head (Profile.head_costs)")
        if kind not in self.cost_kinds:
            raise ProfileError(f"unknown cost kind {kind!r}; the profile has {', '.join(self.cost_kinds)}")
        if weighting not in WEIGHTINGS:
            raise ProfileError(f"unknown sample weighting {weighting!r}; use one of {', '.join(WEIGHTINGS)}")
        if kind == AROUND_KL:
            return self._around_costs(budget, weighting)
        costs = self.arrays[kind].mean(dim=2)  # (N, L, P, G)
        if weighting == "equal":
            scale = costs[..., 0].nanmean(dim=(1, 2))  # (N,): NaN rows are the sliding-window layers
            costs = costs / scale.clamp_min(1e-12)[:, None, None, None]
        return costs.mean(dim=0)

    def _around_costs(self, budget: float | None, weighting: str) -> torch.Tensor:
        if budget is None or float(budget) not in [float(b) for b in self.around_budgets]:
            raise ProfileError(f"around_kl was measured at average budgets {','.join(map(str, self.around_budgets))}"
                               f", not {budget:g}; re-run calibrate with --around {budget:g} or pick one of those"
                               if budget is not None else "around_kl costs need the target average budget")
        if weighting != "mean":
            raise ProfileError("around_kl costs are shares of the output distribution, one scale for every sample; "
                               "use --weighting mean")
        a = [float(b) for b in self.around_budgets].index(float(budget))
        base = self.arrays[AROUND_BASE][:, a].double()  # (N,)
        probe = self.arrays[AROUND_KL][:, :, a].double()  # (N, L, P, G)
        lost = torch.exp(-base)[:, None, None, None] - torch.exp(-probe)
        return lost.mean(dim=0).float()

    def head_costs(self, kind: str = HEAD_KL, weighting: str = "mean") -> torch.Tensor:
        """Cost per (layer, KV head, policy, budget) averaged over samples: (L, H_kv, P, G); "equal" weighting first
        divides each sample's costs by its own level (its mean over compressible layers, heads and policies at the
        lowest budget level)."""
        if kind not in HEAD_COST_KINDS:
            raise ProfileError(f"{kind!r} is not a cost per KV head; the per-head costs are "
                               f"{', '.join(HEAD_COST_KINDS)}")
        if kind not in self.arrays:
            raise ProfileError(f"this profile has no {kind} costs; re-run calibrate with {HEAD_MODE_FLAGS[kind]} to "
                               "measure them")
        if weighting not in WEIGHTINGS:
            raise ProfileError(f"unknown sample weighting {weighting!r}; use one of {', '.join(WEIGHTINGS)}")
        costs = self.arrays[kind]  # (N, L, H_kv, P, G)
        if weighting == "equal":
            scale = costs[..., 0].nanmean(dim=(1, 2, 3))  # (N,): NaN rows are the sliding-window layers
            costs = costs / scale.clamp_min(1e-12)[:, None, None, None, None]
        return costs.mean(dim=0)

    @property
    def cost_kinds(self) -> list[str]:
        """The cost kinds this profile holds."""
        kinds = [*COST_KINDS, *(k for k in OPTIONAL_COST_KINDS if k in self.arrays)]
        kinds += [AROUND_KL] if AROUND_KL in self.arrays else []
        return kinds + [k for k in HEAD_COST_KINDS if k in self.arrays]

    def layer_signals(self) -> dict[str, torch.Tensor]:
        """Mean signal per layer over samples and KV heads: name -> (L,)."""
        return {k.split(".", 1)[1]: v.mean(dim=(0, 2)) for k, v in self.arrays.items() if k.startswith("signal.")}

    def subset(self, indices: list[int]) -> Profile:
        """The profile of the samples at `indices` (in that order): every array is per sample along its first axis."""
        n = self.num_samples
        if not indices or any(not 0 <= i < n for i in indices):
            raise ProfileError(f"sample indices {indices} are not a non-empty subset of the profile's {n} samples")
        samples = self.header.get("samples")
        header = {**self.header, "samples": [samples[i] for i in indices]} if isinstance(samples, list) and \
            len(samples) == n else dict(self.header)
        return Profile(header=header, arrays={k: v[indices] for k, v in self.arrays.items()})

    # -- files -------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        tensors = {k: v.contiguous().float() if v.is_floating_point() else v.contiguous()
                   for k, v in self.arrays.items()}
        header = json.dumps(self.header)
        meta = {HEADER_KEY: header, CHECKSUM_KEY: profile_sha256(tensors, header)}
        return write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        path = Path(path)
        if not path.is_file():
            raise ProfileError(f"profile {path} does not exist; run `polykv-search calibrate` first")
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
            arrays = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ProfileError(f"{path} is not a readable safetensors profile ({exc}); re-run calibrate") from exc
        if HEADER_KEY not in meta:
            raise ProfileError(f"{path} has no polykv-search header; it is not a profile written by calibrate")
        _check_sealed(path, arrays, meta)
        try:
            header = json.loads(meta[HEADER_KEY])
        except json.JSONDecodeError as exc:
            raise ProfileError(f"{path}: the profile header is not JSON ({exc.msg}); the file is damaged, re-run "
                               "calibrate") from exc
        if not isinstance(header, dict):
            raise ProfileError(f"{path}: the profile header is a JSON {type(header).__name__}, not an object; the "
                               "file is damaged, re-run calibrate")
        if header.get("format") != PROFILE_FORMAT:
            raise ProfileError(f"{path} is not a polykv-search profile (format {header.get('format')!r})")
        version = header.get("format_version")
        if version not in READABLE_VERSIONS:
            raise ProfileError(f"{path} is profile format version {version}, this polykv-search reads versions "
                               f"{', '.join(map(str, READABLE_VERSIONS))}; re-run `polykv-search calibrate` to "
                               "rebuild it")
        missing = [key for key in REQUIRED_HEADER if key not in header]
        if missing:
            raise ProfileError(f"{path}: the profile header lacks {', '.join(missing)}; the file is damaged or "
                               "edited, re-run calibrate")
        try:
            ModelInfo.from_dict(header["model"])
        except (TypeError, KeyError, ValueError, AttributeError) as exc:
            raise ProfileError(f"{path}: the profile header's model is unreadable ({type(exc).__name__}: {exc}); "
                               "the file is damaged or edited, re-run calibrate") from exc
        if version == 1 and header.get("around"):
            header = {**header, "format_version": PROFILE_VERSION,
                      "around": [_upgraded_background(entry, ModelInfo.from_dict(header["model"]))
                                 for entry in header["around"]]}
        profile = cls(header=header, arrays=arrays)
        try:
            profile.check()
        except ProfileError as exc:
            raise ProfileError(f"{path}: {exc}") from None
        return profile

    def check_model(self, info: ModelInfo) -> None:
        """ProfileError unless the profile was calibrated on the model `info` describes (identity and geometry)."""
        mine = self.model
        fields = ("model_id", "revision", "num_layers", "layer_types", "num_kv_heads", "head_dim")
        differ = [f for f in fields if getattr(mine, f) != getattr(info, f)]
        if differ:
            raise ProfileError(f"the profile was calibrated on {mine.model_id} but the model is {info.model_id} "
                               f"({', '.join(differ)} differ); calibrate this model or pass its profile")

    def around_backgrounds(self) -> list[dict[str, Any]]:
        """The `calibrate --around` backgrounds: {"budget", "name", "kept", "plan"} each (empty without them)."""
        return list(self.header.get("around", [])) if AROUND_KL in self.arrays else []

    def check(self) -> None:
        """Shapes agree with the header: raises ProfileError naming the first mismatch."""
        info = self.model
        expected = (info.num_layers, info.num_kv_heads, len(self.policies), len(self.budgets))
        for kind in COST_KINDS:
            if kind not in self.arrays:
                raise ProfileError(f"profile lacks the {kind!r} array; re-run calibrate")
            if tuple(self.arrays[kind].shape[1:]) != expected:
                raise ProfileError(f"profile array {kind} has shape {tuple(self.arrays[kind].shape)}, expected "
                                   f"(N, {', '.join(map(str, expected))}) from its header; re-run calibrate")
        for kind in OPTIONAL_COST_KINDS:
            probed = self.arrays.get(kind)
            if probed is not None and tuple(probed.shape[1:]) != (info.num_layers, 1, *expected[2:]):
                raise ProfileError(f"profile array {kind} has shape {tuple(probed.shape)}, expected (N, "
                                   f"{info.num_layers}, 1, {expected[2]}, {expected[3]}) from its header; re-run "
                                   "calibrate")
        for kind in HEAD_COST_KINDS:
            head = self.arrays.get(kind)
            if head is not None and tuple(head.shape[1:]) != expected:
                raise ProfileError(f"profile array {kind} has shape {tuple(head.shape)}, expected "
                                   f"(N, {', '.join(map(str, expected))}) from its header; re-run calibrate")
        if AROUND_KL in self.arrays:
            n_around = len(self.header.get("around", []))
            want = {AROUND_KL: (info.num_layers, n_around, *expected[2:]), AROUND_BASE: (n_around,)}
            for kind, shape in want.items():
                got = self.arrays.get(kind)
                if got is None or tuple(got.shape[1:]) != shape:
                    raise ProfileError(f"profile array {kind} has shape {None if got is None else tuple(got.shape)}"
                                       f", expected (N, {', '.join(map(str, shape))}) from its header; re-run "
                                       "calibrate")
        if self.num_samples != len(self.header.get("samples", [])):
            raise ProfileError("profile sample count does not match its header; re-run calibrate")
        self._check_ranges()

    def _check_ranges(self) -> None:
        """Every cost finite and in its documented range (NaN only in sliding-window layers)."""
        sliding = [i for i in range(self.model.num_layers) if i not in set(self.model.compressible_layers)]
        for kind, (low, high) in COST_RANGES.items():
            values = self.arrays.get(kind)
            if values is None or not values.is_floating_point():
                continue
            nan = torch.isnan(values)
            if kind != AROUND_BASE and sliding and values.dim() > 1:
                nan[:, sliding] = False  # sliding-window layers are NaN by design
            bad = nan | (~torch.isnan(values) & ((values < low) | (values > high)))
            if bool(bad.any()):
                where = tuple(int(i) for i in bad.nonzero()[0])
                raise ProfileError(f"profile array {kind} holds {float(values[where]):g} at {where}, outside "
                                   f"[{low:g}, {high:g}]; the file is damaged or edited, re-run calibrate")


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """A checksum of named tensors: names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def profile_sha256(tensors: dict[str, torch.Tensor], header: str) -> str:
    """A profile's checksum: its tensors' (tensors_sha256) and its header's text, as stored."""
    return hashlib.sha256(f"{tensors_sha256(tensors)}|{header}".encode()).hexdigest()


def _check_sealed(path: Path, arrays: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """ProfileError unless the profile's checksum is there and matches its tensors and header. A checksum of the
    tensors alone (profiles written before the header was covered) is accepted with a warning."""
    recorded = meta.get(CHECKSUM_KEY)
    if recorded is None:
        raise ProfileError(f"{path} has no checksum ({CHECKSUM_KEY}): it is damaged or was edited, and cannot be "
                           "trusted; re-run calibrate")
    if recorded == profile_sha256(arrays, meta[HEADER_KEY]):
        return
    if recorded == tensors_sha256(arrays):
        logger.warning("%s: its checksum covers its tensors only (written by an older polykv-search), its header is "
                       "not verified; re-run calibrate to seal it whole", path)
        return
    raise ProfileError(f"{path} is damaged or was edited: its content does not match its checksum; re-run "
                       "calibrate")


def _upgraded_background(entry: dict[str, Any], info: ModelInfo) -> dict[str, Any]:
    """A version-1 background (a uniform policy, or a plan's per-layer policy and budget lists) as a plan."""
    if "plan" in entry and isinstance(entry["plan"], dict):
        return entry
    if "policies" in entry:
        layers = [LayerPlan.of(i, policy, budget) for i, (policy, budget) in
                  enumerate(zip(entry["policies"], entry["budgets"])) if policy is not None]
        plan = Plan.build(info, layers=layers, average_budget=entry["budget"],
                          search=SearchInfo(solver="unknown", status="from a version 1 profile"))
        name = entry["plan"]
    else:
        plan, name = uniform_plan(info, policy=entry["policy"], budget=entry["budget"]), entry["policy"]
    kind = "plan" if "policies" in entry else "uniform"
    return {"budget": int(entry["budget"]), "name": name, "kind": kind, "kept": entry.get("kept"),
            "plan": plan.to_dict()}
