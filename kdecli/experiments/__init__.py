"""Experiments: each is one folder (or module) holding its run, its records, its report and its
plot.  ``compare`` measures methods against exact attention on one input; ``scale`` against n;
``drift`` what a method does to a model's output; ``inspect`` describes an input."""
