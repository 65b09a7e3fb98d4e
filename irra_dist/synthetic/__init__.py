"""The synthetic person dataset of the demo and the tests: :mod:`~irra_dist.synthetic.render` draws a person
and writes captions naming its attributes; :mod:`~irra_dist.synthetic.dataset` writes a dataset of them in the
CUHK-PEDES layout."""
