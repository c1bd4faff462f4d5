"""The model layer: everything about the network, and the only place that spells a tensor name.

- :mod:`~qcompile.model.architectures`: one registered description per family (names, linears, statistics
  groups, AWQ scale groups, GGUF hyper-parameters);
- :mod:`~qcompile.model.config`: config.json normalised (:class:`ModelConfig`, ``cfg.arch`` its description);
- :mod:`~qcompile.model.checkpoint`: streaming reads of the safetensors weights;
- :mod:`~qcompile.model.vocab`: the tokenizer's vocabulary for GGUF;
- :mod:`~qcompile.model.decoder`: weight sources and the layer-by-layer decoder used by calibration and
  verification.

Layering: this package imports nothing of qcompile but :mod:`qcompile.errors`; quantizers, calibration,
exporters and the app import it.
"""
from qcompile.model.architectures import (
                                    ARCHITECTURES,
                                    Architecture,
                                    register,
                                    supported,
)
from qcompile.model.checkpoint import Checkpoint
from qcompile.model.config import ModelConfig, read_config
from qcompile.model.decoder import (
                                    HEAD_CHUNK_BYTES,
                                    CheckpointSource,
                                    QuantizedSource,
                                    StreamedDecoder,
                                    WeightSource,
)
from qcompile.model.vocab import Vocab, load_vocab

__all__ = ["ARCHITECTURES", "Architecture", "Checkpoint", "CheckpointSource", "HEAD_CHUNK_BYTES", "ModelConfig",
           "QuantizedSource", "StreamedDecoder", "Vocab", "WeightSource", "load_vocab", "read_config", "register",
           "supported"]
