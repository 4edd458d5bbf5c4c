"""The research pipeline: the offline transfer experiment (``Experiment``), its packaged configs
(``configs/demo.json``, ``configs/full.json``) and its report (``report.write_report``)."""
