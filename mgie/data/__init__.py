"""Data: edit records from every supported data set, and the training dataset."""
