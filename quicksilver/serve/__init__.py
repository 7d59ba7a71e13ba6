"""An OpenAI-compatible server for one model (``quicksilver serve``; the ``serve`` extra).

``app`` holds the routes, ``protocol`` checks request bodies, ``scheduler`` queues requests
for the one worker thread that runs the model, ``runner`` runs a batch, ``responses`` writes
OpenAI's shapes, ``metrics`` the Prometheus text and ``server`` runs it all under uvicorn.
"""
