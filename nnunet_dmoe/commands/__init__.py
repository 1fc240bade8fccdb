"""Commands that combine the layers below: the cost benchmark, the demo, one network per level, the routing report."""
