"""Tables of phrasings that variants.py draws on: anatomical regions for partitioned reports, wording
rules of paraphrases, and the wordings of injected errors; and evaluate.py's zero-shot prompts. Data, not
method: skip it on a first read."""

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

# Every entry below is a rule with a family (reports.rule_family of its key): training variants draw on the
# 'train' rules, the evaluation's queries and errors on the 'eval' ones.

# Wording rules, clinically equivalent rewrites of one sentence: (key, pattern, replacement). The
# replacement may use the pattern's groups; a sentence gets at most one of them.
WORDINGS = [
    ("heart size is normal -> cardiac silhouette normal in size", r"^(?:the )?heart size is normal\b",
     "The cardiac silhouette is normal in size"),
    ("heart size is normal -> heart is normal in size", r"^(?:the )?heart size is normal\b",
     "The heart is normal in size"),
    ("heart size is normal -> normal heart size", r"^(?:the )?heart size is normal\.$", "Normal heart size."),
    ("heart is normal in size -> heart size is normal", r"^(?:the )?heart is normal in size\b", "Heart size is normal"),
    ("normal heart size -> heart size is normal", r"^normal heart size\.$", "Heart size is normal."),
    ("cardiac silhouette normal in size -> heart size is normal",
     r"^(?:the )?cardiac silhouette is normal in size\b", "Heart size is normal"),
    ("cardiomediastinal silhouette is normal -> normal cardiomediastinal silhouette",
     r"^(?:the )?cardiomediastinal silhouette is (?:normal|within normal limits)\.$",
     "Normal cardiomediastinal silhouette."),
    ("normal cardiomediastinal silhouette -> cardiomediastinal silhouette within normal limits",
     r"^normal cardiomediastinal silhouette\.$", "The cardiomediastinal silhouette is within normal limits."),
    ("heart and mediastinum normal -> cardiomediastinal silhouette normal",
     r"^(?:the )?heart and mediastinum are (?:normal|unremarkable)\.$", "The cardiomediastinal silhouette is normal."),
    ("lungs are clear -> clear lungs", r"^(?:the )?lungs are clear\.$", "Clear lungs."),
    ("lungs are clear -> lungs are clear bilaterally", r"^(?:the )?lungs are clear\.$",
     "The lungs are clear bilaterally."),
    ("clear lungs -> lungs are clear", r"^clear lungs\.$", "The lungs are clear."),
    ("lungs are clear -> no focal airspace disease", r"^(?:the )?lungs are clear\.$", "No focal airspace disease."),
    ("no focal airspace disease -> lungs are clear", r"^no focal airspace disease\.$", "The lungs are clear."),
    ("no evidence of x -> no x", r"^no evidence of (?!acute)", "No "),
    ("no x -> no evidence of x", r"^no (?=(?:focal |pleural |pulmonary )?(?:consolidation|effusion|edema|pneumothorax"
     r"|pneumonia|pleural effusion)\b)", "No evidence of "),
    ("no x -> there is no x", r"^no (?!acute|active)(?![a-z]+s\b)", "There is no "),
    ("there is no x -> no x", r"^there (?:is|are) no ", "No "),
    ("no x -> x is not seen", r"^no ((?:focal |large |visible )?[a-z]+)\.$", r"\1 is not seen."),
    ("x is seen -> there is x", r"^((?:small|mild|minimal|moderate|large) [a-z ]+?) is (?:seen|noted|present)\.$",
     r"There is \1."),
    ("there is x -> x is seen", r"^there is (?!no\b)(?:an? )?((?:small|mild|minimal|moderate|large) [a-z ]+)\.$",
     r"\1 is seen."),
    ("no pleural effusion or pneumothorax -> split",
     r"^no (pleural effusion|effusion|pneumothorax|focal consolidation) or (pneumothorax|pleural effusion|effusion"
     r"|focal consolidation)\.$", r"No \1. No \2."),
    ("no pleural effusion and no pneumothorax -> or", r"^no ([a-z ]+?),? and no ([a-z ]+)\.$", r"No \1 or \2."),
    ("no acute cardiopulmonary abnormality -> disease", r"^no acute cardiopulmonary (?:abnormality|abnormalities)\b",
     "No acute cardiopulmonary disease"),
    ("no acute cardiopulmonary findings -> abnormality", r"^no acute cardiopulmonary (?:findings?)\b",
     "No acute cardiopulmonary abnormality"),
    ("no acute cardiopulmonary disease -> process", r"^no acute cardiopulmonary disease\b",
     "No acute cardiopulmonary process"),
    ("no acute cardiopulmonary process -> findings", r"^no (?:evidence of )?acute cardiopulmonary process\b",
     "No acute cardiopulmonary findings"),
    ("negative for acute abnormality -> no acute abnormality", r"^negative for acute", "No acute"),
    ("no acute disease -> no acute cardiopulmonary disease", r"^no acute disease\b",
     "No acute cardiopulmonary disease"),
    ("no active disease -> no active cardiopulmonary disease", r"^no active disease\b",
     "No active cardiopulmonary disease"),
    ("within normal limits -> normal", r"\bwithin normal limits\b", "normal"),
    ("are normal -> are within normal limits", r"\b(is|are) normal\.$", r"\1 within normal limits."),
    ("unremarkable -> normal", r"\b(is|are) unremarkable\b", r"\1 normal"),
    ("osseous structures intact -> no acute bony abnormality",
     r"^(?:the )?(?:osseous|bony) structures are (?:intact|unremarkable)\.$", "No acute bony abnormality."),
    ("no acute bony abnormality -> osseous structures intact", r"^no acute (?:bony|osseous) abnormality\.$",
     "The osseous structures are intact."),
    ("pulmonary vascularity normal -> normal pulmonary vasculature",
     r"^(?:the )?pulmonary vascularity is (?:normal|within normal limits)\.$", "Normal pulmonary vasculature."),
    ("stable -> unchanged", r"\bstable\b", "unchanged"),
    ("unchanged -> stable", r"\bunchanged\b", "stable"),
    ("consistent with -> compatible with", r"\bconsistent with\b", "compatible with"),
    ("compatible with -> consistent with", r"\bcompatible with\b", "consistent with"),
    ("mild -> slight", r"\bmild\b", "slight"),
    ("mildly -> slightly", r"\bmildly\b", "slightly"),
    ("no pleural effusion -> no effusion", r"\bno pleural effusions?\b", "no effusion"),
    ("no effusion -> no pleural effusion", r"\bno effusions?\b(?! or)", "no pleural effusion"),
    ("pneumothorax absent -> no pneumothorax", r"^there is no evidence of pneumothorax\.$", "No pneumothorax."),
    # synonyms of findings and their words
    ("cardiomegaly -> enlargement of the heart", r"\bcardiomegaly\b", "enlargement of the heart"),
    ("cardiomegaly -> cardiac enlargement", r"\bcardiomegaly\b", "cardiac enlargement"),
    ("pleural effusion -> pleural fluid", r"\bpleural effusion\b", "pleural fluid"),
    ("atelectasis -> atelectatic change", r"\batelectasis\b", "atelectatic change"),
    ("no x -> negative for x", r"^no (?!acute|active)", "Negative for "),
    ("hyperinflated -> hyperexpanded", r"\bhyperinflated\b", "hyperexpanded"),
    ("hyperexpanded -> hyperinflated", r"\bhyperexpanded\b", "hyperinflated"),
    ("lungs are clear -> lung fields are clear", r"^(?:the )?lungs are clear\b", "The lung fields are clear"),
    ("osseous -> bony", r"\bosseous\b", "bony"),
    ("bony -> osseous", r"\bbony\b", "osseous"),
    ("severe -> marked", r"\bsevere\b", "marked"),
    ("marked -> severe", r"\bmarked\b", "severe"),
    ("heart size -> cardiac size", r"\bheart size\b", "cardiac size"),
    ("cardiomegaly -> heart enlargement", r"\bcardiomegaly\b", "heart enlargement"),
    ("is normal -> is unremarkable", r"\b(is|are) normal\b(?! in)", r"\1 unremarkable"),
    ("chronic -> longstanding", r"\bchronic\b(?! obstructive)", "longstanding"),
    ("decreased -> reduced", r"\bdecreased\b", "reduced"),
    ("increased markings -> accentuated markings", r"\bincreased ((?:interstitial |bronchovascular |lung )?markings)\b",
     r"accentuated \1"),
    ("bilateral effusions -> effusions on both sides",
     r"\bbilateral ((?:small |large |moderate )?(?:pleural effusions|effusions|pneumothoraces))\b", r"\1 on both sides"),
    ("thoracic spine -> dorsal spine", r"\bthoracic spine\b", "dorsal spine"),
    ("hemidiaphragm -> side of the diaphragm", r"\b(left|right) hemidiaphragm\b", r"\1 side of the diaphragm"),
    ("metastases -> metastatic disease", r"\bmetastases\b", "metastatic disease"),
    ("scarring -> scar formation", r"\bscarring\b", "scar formation"),
    ("infiltrate -> airspace opacity", r"\binfiltrate\b", "airspace opacity"),
    ("infiltrates -> airspace opacities", r"\binfiltrates\b", "airspace opacities"),
    ("opacity -> opacification", r"\bopacity\b", "opacification"),
    ("nodule -> nodular density", r"\bnodule\b", "nodular density"),
    ("hyperinflation -> hyperexpansion", r"\bhyperinflation\b", "hyperexpansion"),
    ("emphysema -> emphysematous change", r"\bemphysema\b", "emphysematous change"),
    ("scoliosis -> scoliotic curvature", r"\bscoliosis\b", "scoliotic curvature"),
    ("kyphosis -> kyphotic curvature", r"\bkyphosis\b", "kyphotic curvature"),
    ("degenerative changes of the spine -> spondylosis",
     r"\bdegenerative changes (?:of|in|within) the (thoracic |lumbar |cervical )?spine\b", r"\1spondylosis"),
    ("pneumonia -> infectious process", r"\bpneumonia\b", "infectious process"),
    ("pleural effusions -> pleural fluid collections", r"\bpleural effusions\b", "pleural fluid collections"),
]
# Two sentences in one (the reverse of the split rule above): (key, pattern over a text, replacement).
_TWO_DENIALS = r"\bNo ([a-z]+(?: [a-z]+)?)\. No ([a-z]+(?: [a-z]+)?)\."
MERGES = [("no x. no y. -> no x or y", _TWO_DENIALS, r"No \1 or \2."),
          ("no x. no y. -> no x and no y", _TWO_DENIALS, r"No \1 and no \2.")]

# Error wordings. A finding denied, in place of a sentence that reported it (several lengths each, so
# that the wrong impression keeps the length of the true one).
NEGATED = {
    "Cardiomegaly": ["Heart size is normal.", "Normal heart size.", "The heart is not enlarged.",
                     "The cardiac silhouette is normal in size.", "No cardiomegaly."],
    "Enlarged Cardiomediastinum": ["Normal mediastinal contours.", "The mediastinum is not widened.",
                                   "Normal cardiomediastinal silhouette.", "Mediastinum is normal."],
    "Lung Opacity": ["No focal opacity.", "The lungs are clear.", "No focal airspace opacity is seen.",
                     "Clear lungs.", "No airspace opacity."],
    "Lung Lesion": ["No pulmonary nodule or mass.", "No nodules.", "No lung nodule.", "No suspicious pulmonary mass.",
                    "No suspicious nodule or mass.", "No pulmonary nodules are seen.", "No focal nodule or mass."],
    "Edema": ["No pulmonary edema.", "No edema.", "There is no pulmonary edema.", "No evidence of edema."],
    "Consolidation": ["No focal consolidation.", "No consolidation.", "There is no focal consolidation.",
                      "No airspace consolidation."],
    "Pneumonia": ["No evidence of pneumonia.", "No pneumonia.", "There is no pneumonia.", "No findings of pneumonia."],
    "Atelectasis": ["No atelectasis.", "No evidence of atelectasis.", "There is no atelectasis.",
                    "No focal atelectasis."],
    "Pneumothorax": ["No pneumothorax.", "There is no pneumothorax.", "No evidence of pneumothorax.",
                     "No pneumothorax is seen."],
    "Pleural Effusion": ["No pleural effusion.", "No effusion.", "No pleural effusion is seen.",
                         "There is no pleural effusion.", "No evidence of pleural effusion."],
    "Pleural Other": ["No pleural thickening.", "No pleural abnormality.", "There is no pleural thickening."],
    "Fracture": ["No fracture.", "No acute fracture.", "No displaced rib fracture.", "No fractures are seen."],
    "Support Devices": ["No lines or tubes.", "No support devices.", "No lines, tubes or devices."],
}
# A finding asserted: in place of a sentence that denied it, or of a normal statement (a false finding).
POSITIVE = {
    "Cardiomegaly": ["{Degree} cardiomegaly.", "Cardiomegaly.", "The heart is {degree}ly enlarged.",
                     "{Degree} enlargement of the cardiac silhouette."],
    "Edema": ["{Degree} pulmonary edema.", "Pulmonary edema.", "{Degree} interstitial pulmonary edema.",
              "There is {degree} pulmonary edema.",
              "Interstitial edema.", "{Degree} edema.", "Diffuse pulmonary edema."],
    "Lung Opacity": ["Patchy opacity in the {side} lower lobe.", "{Side} basilar opacity.", "{Side} lung opacity.",
                     "Hazy opacity in the {side} lung base."],
    "Lung Lesion": ["{mm} mm nodule in the {side} upper lobe.", "{Side} lung nodule.", "{Side} upper lobe mass.",
                    "{mm} mm {side} lower lobe pulmonary nodule.",
                    "Pulmonary nodule in the {side} lung.", "{Side} lower lobe nodule.",
                    "Spiculated {side} upper lobe mass."],
    "Consolidation": ["{Side} lower lobe consolidation.", "{Side} consolidation.",
                      "Focal consolidation in the {side} lower lobe.",
                      "Consolidation in the {side} lung base.", "{Side} basilar consolidation.",
                      "{Degree} {side} lower lobe consolidation."],
    "Pneumonia": ["{Side} lower lobe pneumonia.", "{Side} pneumonia.", "Findings of {side} lower lobe pneumonia.",
                  "Pneumonia in the {side} lung base.", "{Side} basilar pneumonia."],
    "Atelectasis": ["{Side} basilar atelectasis.", "{Side} atelectasis.", "{Degree} bibasilar atelectasis.",
                    "Linear atelectasis in the {side} lung base."],
    "Pneumothorax": ["{Size} {side} apical pneumothorax.", "{Side} pneumothorax.", "{Size} {side} pneumothorax.",
                     "There is a {size} {side} pneumothorax."],
    "Pleural Effusion": ["{Size} {side} pleural effusion.", "{Size} {side} effusion.", "{Side} effusion.",
                         "There is a {size} {side} pleural effusion.", "{Size} bilateral pleural effusions."],
    "Fracture": ["Acute fracture of the {side} 6th rib.", "{Side} rib fracture.", "Acute {side} rib fracture.",
                 "Displaced fracture of the {side} clavicle."],
}
# A support device, in place of a normal sentence.
DEVICE_SENTENCES = ["{Side} internal jugular central venous catheter with tip in the superior vena cava.",
                    "Endotracheal tube with tip 4 cm above the carina.", "Nasogastric tube with tip in the stomach.",
                    "{Side} chest tube in place.", "Chest tube in place.", "Pacemaker in place.",
                    "{Side}-sided pacemaker with leads in the right atrium and right ventricle.",
                    "{Side} PICC with tip in the superior vena cava.", "Endotracheal tube in place.",
                    "Feeding tube in the stomach.", "{Side} PICC line in place.", "Dual-lead pacemaker in place.",
                    "{Side} central venous catheter in place."]
# Severity and device-position changes: (word, replacement) pairs written {word: 'replacement|...'}.
SEVERITY_SWAP = {"minimal": "moderate|large|severe", "mild": "severe|moderate|marked|moderate to severe",
                 "mildly": "markedly|severely", "slight": "marked|moderate", "slightly": "markedly|moderately|severely",
                 "moderate": "mild|severe|minimal", "moderately": "mildly|severely", "severe": "mild|minimal|slight",
                 "severely": "mildly|minimally", "marked": "mild|slight", "markedly": "mildly|slightly",
                 "trace": "large|moderate", "tiny": "large|moderate", "small": "large|moderate|extensive",
                 "large": "small|tiny|trace", "massive": "small|trace", "extensive": "minimal|mild"}
SEVERITY_ADDED = ["mild", "moderate", "severe", "marked", "minimal", "extensive"]  # before a finding that had none
DEVICE_MOVES = {"superior vena cava": "right atrium|brachiocephalic vein", "svc": "right atrium|azygos vein",
                "right atrium": "superior vena cava|right ventricle",
                "cavoatrial junction": "brachiocephalic vein|right ventricle", "stomach": "esophagus|duodenum",
                "esophagus": "stomach|trachea",
                "above the carina": "in the right mainstem bronchus|in the left mainstem bronchus"}

# Terms a report could have written in each other's place. A near-duplicate of an acronym or paraphrase answer
# (cases.py) swaps one of them for another of its group where the query rewrote it, so that only reading the
# rewritten word tells the answer from its copies. A term in several groups may become any of their terms.
CONFUSABLE = [
    "consolidation|opacity|atelectasis|infiltrate|pneumonia|edema|scarring", "effusion|pneumothorax|thickening",
    "nodule|mass|granuloma", "cardiomegaly|pneumomediastinum|pericardial effusion", "emphysema|hyperinflation|fibrosis",
    "fracture|deformity|dislocation", "scoliosis|kyphosis", "effusions|pneumothoraces", "nodules|masses|granulomas",
    "opacities|infiltrates|densities", "fractures|deformities", "consolidative|atelectatic|nodular",
    "pleural effusion|pleural thickening|pericardial effusion", "pulmonary edema|pulmonary fibrosis|pulmonary embolism",
    "pulmonary nodule|pulmonary mass|pulmonary cyst", "pleural effusions|pleural plaques",
    "left|right", "bilateral|unilateral", "bilaterally|unilaterally", "left-sided|right-sided",
    "right lower lobe|right middle lobe|right upper lobe|left lower lobe|left upper lobe|lingula",
    "endotracheal tube|nasogastric tube|orogastric tube|chest tube|feeding tube|tracheostomy tube",
    "endotracheal|nasogastric|orogastric", "internal jugular|subclavian|femoral",
    "right internal jugular|left internal jugular|right subclavian|left subclavian",
    "peripherally inserted central catheter|central venous catheter|pulmonary artery catheter|dialysis catheter",
    "superior vena cava|inferior vena cava|right atrium|right ventricle|left ventricle|brachiocephalic vein",
    "small|moderate|large", "mild|moderate|severe", "minimal|mild|moderate", "increased|decreased",
    "with|without", "normal|abnormal", "anteroposterior|posteroanterior|lateral",
    "chronic obstructive pulmonary disease|congestive heart failure|interstitial lung disease|tuberculosis"
    "|acute respiratory distress syndrome|coronary artery disease|hypertension",
    "coronary artery bypass graft|aortic valve replacement|mitral valve replacement",
    "permanent pacemaker|automatic implantable cardioverter-defibrillator",
    "thoracic spine|lumbar spine|cervical spine", "costophrenic angle|hemidiaphragm|cardiophrenic angle",
    "proximal|distal", "metastases|lymphadenopathy", "degenerative joint disease|osteoporosis",
    "gastroesophageal junction|carina|stomach", "volumes|markings", "unchanged|worsened|improved",
    "acute|chronic", "history of|no history of",
]

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
