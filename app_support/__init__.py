"""The app's side of JPQ Explorer: Streamlit glue shared by the pages (cached loaders, the sidebar, error
display). The library, `jpq_core`, imports no Streamlit; everything computed lives there."""
