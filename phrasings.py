"""Tables of phrasings that variants.py draws on: anatomical regions for partitioned reports, and
the wordings of injected errors; and evaluate.py's zero-shot prompts. Data, not method: skip it on a first read."""

# Anatomical partition: a sentence goes to the region of its first keyword; 'Other' is tried first so that
# 'no acute cardiopulmonary disease' is not filed under the heart.
REGIONS = [("Other", r"cardiopulmonary|acute\s+(?:disease|process|abnormalit\w*)"),
            ("Devices", r"tubes?|lines?|catheters?|picc|pacemakers?|pacer|leads?|devices?|wires?|clips?|stents?"
                        r"|drains?|hardware|sternotomy|prosthe\w*|icd|defibrillator|endotracheal|nasogastric|ports?"),
            ("Pleura", r"pleura\w*|effusions?|pneumothora\w*|costophrenic|fissures?"),
            ("Heart and mediastinum", r"heart|cardi\w*|mediastin\w*|aort\w*|hila|hilar|hilum|pericardi\w*|trachea"),
            ("Lungs", r"lungs?|pulmonary|opacit\w*|atelecta\w*|consolidat\w*|pneumonia|edema|air\s?space|infiltrat\w*"
                      r"|nodul\w*|mass|granulom\w*|emphysema|interstitial|vascula\w*|parenchym\w*|lobes?|basilar"
                      r"|bibasilar|congestion|scar\w*|lingula"),
            ("Bones", r"bones?|bony|osseous|spine|spinal|vertebra\w*|ribs?|fractur\w*|degenerat\w*|scolio\w*|kypho\w*"
                      r"|clavicles?|shoulders?|humer\w*|osteo\w*|skelet\w*|thoracic")]
PARTITION_ORDER = ["Lungs", "Pleura", "Heart and mediastinum", "Bones", "Devices", "Other"]
SWAP_SIDE = {"left": "right", "right": "left", "l": "R", "r": "L", "lll": "RLL", "rll": "LLL", "lul": "RUL",
              "rul": "LUL"}
SEVERITY_SWAP = {"minimal": "moderate", "mild": "severe", "mildly": "markedly", "slight": "marked",
                  "slightly": "markedly", "moderate": "mild severe", "moderately": "mildly severely", "severe": "mild",
                  "severely": "mildly", "marked": "mild", "markedly": "mildly", "trace": "large", "tiny": "large",
                  "small": "large", "large": "small", "massive": "small", "extensive": "minimal"}
NEGATED = {"Cardiomegaly": "Heart size is normal.", "Enlarged Cardiomediastinum": "Normal mediastinal contours.",
            "Lung Opacity": "No focal opacity.", "Lung Lesion": "No pulmonary nodule or mass.",
            "Edema": "No pulmonary edema.", "Consolidation": "No focal consolidation.",
            "Pneumonia": "No evidence of pneumonia.", "Atelectasis": "No atelectasis.",
            "Pneumothorax": "No pneumothorax.", "Pleural Effusion": "No pleural effusion.",
            "Pleural Other": "No pleural thickening.", "Fracture": "No fracture.",
            "Support Devices": "No lines or tubes."}
FALSE_FINDINGS = {"Cardiomegaly": "{Degree} cardiomegaly.", "Edema": "{Degree} pulmonary edema.",
                   "Lung Opacity": "Patchy opacity in the {side} lower lobe.",
                   "Lung Lesion": "{mm} mm nodule in the {side} upper lobe.",
                   "Consolidation": "{Side} lower lobe consolidation.", "Pneumonia": "{Side} lower lobe pneumonia.",
                   "Atelectasis": "{Side} basilar atelectasis.", "Pneumothorax": "{Size} {side} apical pneumothorax.",
                   "Pleural Effusion": "{Size} {side} pleural effusion.",
                   "Fracture": "Acute fracture of the {side} 6th rib."}
DEVICE_SENTENCES = ["{Side} internal jugular central venous catheter with tip in the superior vena cava.",
            "Endotracheal tube with tip 4 cm above the carina.", "Nasogastric tube with tip in the stomach.",
            "{Side} chest tube in place.", "{Side}-sided pacemaker with leads in the right atrium and right ventricle.",
            "{Side} PICC with tip in the superior vena cava."]
DEVICE_MOVES = {"superior vena cava": "right atrium", "svc": "right atrium", "right atrium": "superior vena cava",
                 "cavoatrial junction": "brachiocephalic vein", "stomach": "esophagus", "esophagus": "stomach",
                 "above the carina": "in the right mainstem bronchus"}

# The 14 CheXpert observations, each with a (positive, negative) prompt worded like a report
# sentence, since the text encoder was trained on reports rather than on "a photo of" captions.
ZERO_SHOT_PROMPTS = {
    "No Finding": ("No acute cardiopulmonary abnormality.", "There are acute abnormal findings."),
    "Enlarged Cardiomediastinum": ("The cardiomediastinal silhouette is enlarged.",
                                   "The cardiomediastinal silhouette is normal."),
    "Cardiomegaly": ("The heart is enlarged.", "The heart size is normal."),
    "Lung Opacity": ("There is an opacity in the lung.", "The lungs are clear."),
    "Lung Lesion": ("There is a lung nodule or mass.", "There is no lung nodule or mass."),
    "Edema": ("There is pulmonary edema.", "There is no pulmonary edema."),
    "Consolidation": ("There is focal consolidation.", "There is no focal consolidation."),
    "Pneumonia": ("Findings are concerning for pneumonia.", "There is no evidence of pneumonia."),
    "Atelectasis": ("There is atelectasis.", "There is no atelectasis."),
    "Pneumothorax": ("There is a pneumothorax.", "There is no pneumothorax."),
    "Pleural Effusion": ("There is a pleural effusion.", "There is no pleural effusion."),
    "Pleural Other": ("There is pleural thickening.", "There is no pleural abnormality."),
    "Fracture": ("There is a rib fracture.", "There is no acute fracture."),
    "Support Devices": ("Support lines and tubes are in place.", "There are no lines or tubes."),
}
