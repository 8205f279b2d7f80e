"""torch.optim drop-ins backed by the fused torchopt_ext kernels."""

from ._matrix import MatrixDims
from .adafactor import Adafactor
from .adam import Adam
from .adamw import AdamW
from .kron import Kron, precond_update_prob_schedule
from .kron_psgd import KronPSGD
from .lamb import LAMB
from .lion import Lion
from .mars import MARS
from .muon import NS_PRESETS, Muon, ns_coefficient_table
from .nadamw import NAdamW
from .prism import PRISM
from .qhadamw import QHAdamW
from .radam import RAdam
from .schedulefree import (
    ScheduleFree,
    ScheduleFreeAdamW,
    ScheduleFreeSGD,
    schedule_free_adamw,
    schedule_free_kron,
    schedule_free_prism,
    schedule_free_with_wsd,
)
from .sgd import SGD
from .soap import SOAP
from .sophia import SophiaG, SophiaH
from .white_kron import Quad, Skew, WhiteKron

__all__ = [
    "SGD",
    "Adam",
    "AdamW",
    "NAdamW",
    "RAdam",
    "QHAdamW",
    "Lion",
    "MARS",
    "LAMB",
    "Adafactor",
    "MatrixDims",
    "Muon",
    "NS_PRESETS",
    "ns_coefficient_table",
    "PRISM",
    "Kron",
    "precond_update_prob_schedule",
    "KronPSGD",
    "WhiteKron",
    "Skew",
    "Quad",
    "SOAP",
    "ScheduleFreeAdamW",
    "ScheduleFreeSGD",
    "ScheduleFree",
    "schedule_free_adamw",
    "schedule_free_kron",
    "schedule_free_prism",
    "schedule_free_with_wsd",
    "SophiaH",
    "SophiaG",
]
