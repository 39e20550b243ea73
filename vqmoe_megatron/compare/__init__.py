"""``vqmoe-compare``: routing variants trained side by side on the same data, budget and seeds,
evaluated, fine-tuned and reported (``report.md`` with PNG plots).

``variants`` names what is compared, ``plan`` the commands of each (variant, seed), ``runner``
runs them resumably, ``results`` reads their outputs back, ``plots`` and ``report`` write the
report; ``cli`` is the command.
"""
