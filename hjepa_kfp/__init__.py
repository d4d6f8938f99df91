"""The Kubeflow front door of hjepa: KFP components, the ``@dsl.pipeline`` and its CLI.

- :mod:`hjepa_kfp.components`: ``shard``, ``pretrain``, ``evaluate`` as lightweight components
  whose bodies call the stage functions of :mod:`hjepa_core.pipeline`;
- :mod:`hjepa_kfp.pipeline`: the pipeline, its compiler and the local (SubprocessRunner) run;
- :mod:`hjepa_kfp.cli`: ``hjepa pipeline compile|run-local``, plugged into the ``hjepa`` command
  line through the ``hjepa.commands`` entry point.

It depends on :mod:`hjepa_core` (and kfp); :mod:`hjepa_core` never imports it.
"""
