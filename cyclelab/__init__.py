"""cyclelab: a language model run one clock cycle at a time.

>>> from cyclelab import load, Engine
>>> engine = Engine(load("tiny"))
>>> print(engine.generate("ROMEO:", max_new_tokens=20).table())
"""

from cyclelab.core.engine import Engine, ablation
from cyclelab.core.events import CycleRecord, Event, Stage, Trace
from cyclelab.core.sampling import Sampling
from cyclelab.core.seq2seq_engine import Seq2SeqEngine
from cyclelab.debugger import seq2seq as _seq2seq  # noqa: F401 - registers Debugger's encoder-decoder variant
from cyclelab.debugger.session import Debugger
from cyclelab.loading.device import pick_device
from cyclelab.loading.loader import KNOWN, Loaded, ModelFileError, load
from cyclelab.show import show

__version__ = "0.1.0"
__all__ = [
    "CycleRecord",
    "Debugger",
    "Engine",
    "Event",
    "KNOWN",
    "Loaded",
    "ModelFileError",
    "Sampling",
    "Seq2SeqEngine",
    "Stage",
    "Trace",
    "ablation",
    "load",
    "pick_device",
    "show",
]
