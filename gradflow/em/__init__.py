"""The EM segmentation experiment that ``gradflow record`` runs (Drozdzal et al. 2016): its
settings (:mod:`~gradflow.em.config`), data (:mod:`~gradflow.em.data`), model zoo
(:mod:`~gradflow.em.models`), metrics, checkpoints and training loop
(:func:`gradflow.em.train.train`). The library core never imports this package."""
