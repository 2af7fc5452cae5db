"""Training one configuration with Lightning: the LightningModule, cnnlab's callbacks, the
speed settings, and the job built from checked settings (job.prepare) then fitted and tested
(job.fit_and_test). Nothing here knows MLflow: what a run records is handed out as values."""
