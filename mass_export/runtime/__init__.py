"""The torch-free runtime: numpy, onnxruntime, pillow, safetensors. Nothing here may import torch.

    from mass_export.runtime import MassRuntime
    runtime = MassRuntime.load("build/", providers=("cuda", "cpu"))
    for p in runtime.classify(["cat.jpg", "digit.png"]):
        print(p.path, p.task, p.class_name, p.score, p.error)
"""

from mass_export.runtime.backends import OrtRunner, Runner, make_runner
from mass_export.runtime.engine import MassRuntime, Prediction
from mass_export.runtime.images import IMAGE_EXTENSIONS, PathProblem, expand_paths, load_image
from mass_export.runtime.preprocess import Preprocessor
from mass_export.runtime.taskcache import TaskSetCache

__all__ = ["MassRuntime", "Prediction", "Preprocessor", "Runner", "OrtRunner", "make_runner", "TaskSetCache",
           "expand_paths", "PathProblem", "load_image", "IMAGE_EXTENSIONS"]
