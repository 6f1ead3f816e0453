"""Plasticity mitigations as training-loop callbacks (see docs/mitigations.md).

Importing the package registers every mitigation under its config name:
wd_schedule, l2_init, shrink_perturb, redo, cbp, replay, rejuvenation.
"""
from mitigations import cbp, l2_init, redo, rejuvenation, replay, shrink_perturb, wd_schedule  # noqa: F401
from mitigations.state_access import StateAccess  # noqa: F401
