"""The plan file's checksum: `optimize` and every other writer seal a plan (a top-level "checksum": {"sha256": ...}
of its canonical content), and every reader refuses a plan whose checksum is missing or does not match. A plan written
or edited by hand is checked and sealed with `polykv-search validate --seal PLAN` (`seal_plan_file`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from polykv_search.errors import PlanError
from polykv_search.io import CHECKSUM_FIELD, SealError, seal, unseal, write_atomic

if TYPE_CHECKING:
    from polykv_search.plan.plan import PlanFile


def check_plan_checksum(data: Any, *, source: str, required: bool = True) -> None:
    """PlanError when the parsed plan `data` has a checksum that does not match its content, or (`required`) none."""
    if not isinstance(data, dict) or (CHECKSUM_FIELD not in data and not required):
        return
    try:
        unseal(data)
    except SealError as exc:
        if exc.missing:
            raise PlanError(f"plan file {source} has no checksum, so a damaged copy could not be told apart; if you "
                            f"wrote or edited it yourself, check and seal it: `polykv-search validate --seal "
                            f"{source}`") from None
        raise PlanError(f"plan file {source} is damaged or was edited: its content does not match its checksum; "
                        f"write it again with polykv-search, or if you edited it on purpose, check and seal it again: "
                        f"`polykv-search validate --seal {source}`") from None


def read_unsealed(path: str | Path) -> tuple[PlanFile, dict[str, Any]]:
    """(the plan at `path`, its JSON as it is), validated (InvalidPlanError lists every problem) but its checksum
    not checked: what `validate --seal` reads."""
    from polykv_search.plan.plan import PlanFile  # imported here: plan.py imports this module

    data = PlanFile.parsed(path)
    return PlanFile.from_dict(data, source=str(path)), data


def seal_plan_file(path: str | Path) -> str:
    """Validate the plan at `path` (InvalidPlanError lists every problem) and write it back sealed, its content as
    it is; returns what was done: "sealed", "already sealed" or "sealed again" (its old checksum did not match)."""
    from polykv_search.plan.plan import plan_json_text  # imported here: plan.py imports this module

    path = Path(path)
    _, data = read_unsealed(path)  # every schema and semantic problem, before anything is written
    if CHECKSUM_FIELD in data:
        try:
            unseal(data)
            return "already sealed"
        except SealError:
            status = "sealed again"
    else:
        status = "sealed"
    write_atomic(path, plan_json_text(seal(data)))
    return status
