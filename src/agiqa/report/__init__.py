"""The HTML report: a consumer of run folders, evaluations and score files, above the stages.

``html.py`` renders the page (Jinja2 template in ``templates/``), thumbnails and patch maps;
``sources.py`` reads and checks what a report shows.
"""
