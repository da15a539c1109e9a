"""``pilus ui``: the service map (Hubble UI's): workloads as boxes, flows between them as
edges updated live, dropped edges marked with their reasons, a flow table below.
``graph.py`` is the pure model, ``server.py`` the aiohttp server, ``static/`` the page
(plain JavaScript and SVG, no build step)."""
