"""Public entry points (filled in below)."""

def extract(*a, **k): raise NotImplementedError
def rank(*a, **k): raise NotImplementedError
def score(*a, **k): raise NotImplementedError
