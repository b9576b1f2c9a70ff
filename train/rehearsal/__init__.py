"""``dmc rehearse``: a shipped recipe in miniature, end to end, on whatever machine is at hand."""
