"""Reports for people: the Markdown and HTML verified-configuration tables and their plots."""
