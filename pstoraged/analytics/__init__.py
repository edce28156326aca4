"""Analytics: observers of the pool (capacity history and forecast, health,
data temperature, tiering recommendations, charts). They read the engine and
are fed by the data plane; nothing below imports them.
"""
