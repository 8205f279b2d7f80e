"""torch.optim drop-ins backed by the fused torchopt_ext kernels."""

from .adafactor import Adafactor
from .adam import Adam
from .adamw import AdamW
from .kron_psgd import KronPSGD
from .lamb import LAMB
from .lion import Lion
from .mars import MARS
from .muon import Muon
from .nadamw import NAdamW
from .prism import PRISM
from .qhadamw import QHAdamW
from .radam import RAdam
from .schedulefree import ScheduleFree, ScheduleFreeAdamW, ScheduleFreeSGD, schedule_free_adamw
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
    "Muon",
    "PRISM",
    "KronPSGD",
    "WhiteKron",
    "Skew",
    "Quad",
    "SOAP",
    "ScheduleFreeAdamW",
    "ScheduleFreeSGD",
    "ScheduleFree",
    "schedule_free_adamw",
    "SophiaH",
    "SophiaG",
]
