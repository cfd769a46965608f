"""Rendering shared by every document kind: the width-aware table and ``--columns`` (``table``),
how numbers read (``cells``), the CSV writer (``writers``) and the plot styling (``figures``).

Each experiment's report and plot module builds on these; none of them imports an experiment.
"""
