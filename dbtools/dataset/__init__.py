"""The dataset stage: which files are images, caption rules, the Omnitool (file names ->
caption files) and `concepts_list.json`."""
