"""Measuring localization on box-annotated images (``gapcam evaluate``).

- ``datasets``: annotation readers (wsolevaluation metadata, VOC/ImageNet XML, CSV), validated
- ``metrics``: box accuracy over thresholds (MaxBoxAcc, MaxBoxAccV2) and PxAP, pure numpy
- ``evaluate``: runs a Localizer over a dataset and scores it
- ``report``: the human table of a report
"""
