"""The results page of a trial folder (``page.write_report``) and its vendored viewer files (``static/``)."""
