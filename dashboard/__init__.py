"""The Streamlit dashboard's shared code: cached resources and the run selector, cached reads, figures, form."""
