"""The python_function model of a logged classifier, as MLflow "models from code".

MLflow stores a copy of this file with every model ``deeplense_ray.tracking.models`` logs and runs it when
``mlflow.pyfunc.load_model`` loads the model (``mlflow.models.set_model`` at the end names the model). The
network is rebuilt by the installed package from the model's ``spec`` artifact (JSON) and its weights are
read with ``torch.load(weights_only=True)``: loading unpickles no object. The package does not import this
file; it is MLflow's entry point only.
"""

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class LensClassifier(PythonModel):
    """Images (float32 [N, C, H, W], raw as in the shards) -> DataFrame of class probabilities, one column per
    class (a model of task 'inference': ``mean_<target>``, ``std_<target>`` per target). ``module`` is the
    network (images -> logits or the Gaussian head's outputs) once loaded."""

    def load_context(self, context):
        from deeplense_ray.tracking import models

        self.module = models.module_from_artifacts(
            context.artifacts[models.SPEC_ARTIFACT], context.artifacts[models.WEIGHTS_ARTIFACT]
        )
        device = (context.model_config or {}).get("device") or models.prediction_device()
        # a model of task 'inference' gives per-lens posterior means and stds instead of probabilities
        arch = models.read_spec(context.artifacts[models.SPEC_ARTIFACT])
        self._probabilities = models.prediction_model(self.module, device, arch)

    def predict(self, context, model_input: np.ndarray, params=None):  # a tensor signature: no inference
        return self._probabilities.predict(model_input, params)


mlflow.models.set_model(LensClassifier())
