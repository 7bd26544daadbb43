"""cyclelab: a language model run one clock cycle at a time.

>>> from cyclelab import load, Engine
>>> engine = Engine(load("tiny"))
>>> print(engine.generate("ROMEO:", max_new_tokens=20).table())
"""

from .cycle import CycleRecord, Event, Stage, Trace
from .debugger import Debugger
from .decode import Sampling
from .device import pick_device
from .engine import Engine, ablation
from .models import KNOWN, Loaded, ModelFileError, load
from .show import show

__version__ = "0.1.0"
__all__ = ["CycleRecord", "Debugger", "Engine", "Event", "KNOWN", "Loaded", "ModelFileError", "Sampling", "Stage", "Trace",
           "ablation", "load", "pick_device", "show"]
