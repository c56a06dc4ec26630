"""Reports people read: the HTML report (:mod:`~edgesmith.reports.html`), plots
(:mod:`~edgesmith.reports.plots`) and a run's Markdown report (:mod:`~edgesmith.reports.markdown`)."""
