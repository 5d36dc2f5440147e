{{/* Names and labels, as `helm create` makes them, plus the per-service helpers. */}}

{{- define "spaces.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name, truncated at 63 characters (DNS labels).
*/}}
{{- define "spaces.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "spaces.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "spaces.selectorLabels" -}}
app.kubernetes.io/name: {{ include "spaces.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "spaces.labels" -}}
helm.sh/chart: {{ include "spaces.chart" . }}
{{ include "spaces.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: spaces
{{- end }}

{{/*
The services, in start order. Every template that loops over services uses this list.
*/}}
{{- define "spaces.components" -}}
identity payments notify media rooms gateway
{{- end }}

{{/* Labels of one component: (dict "root" $ "component" "rooms"). */}}
{{- define "spaces.componentLabels" -}}
{{ include "spaces.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "spaces.componentSelectorLabels" -}}
{{ include "spaces.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* The name of a component's objects: (dict "root" $ "component" "rooms"). */}}
{{- define "spaces.componentName" -}}
{{- printf "%s-%s" (include "spaces.fullname" .root | trunc 50 | trimSuffix "-") .component }}
{{- end }}

{{- define "spaces.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "spaces.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The image of a component: its own settings win over the chart-wide ones. */}}
{{- define "spaces.image" -}}
{{- $svc := index .root.Values .component }}
{{- $repository := $svc.image.repository | default .root.Values.image.repository }}
{{- $tag := $svc.image.tag | default .root.Values.image.tag | default .root.Chart.AppVersion }}
{{- printf "%s:%s" $repository $tag }}
{{- end }}

{{- define "spaces.imagePullPolicy" -}}
{{- $svc := index .root.Values .component }}
{{- $svc.image.pullPolicy | default .root.Values.image.pullPolicy }}
{{- end }}

{{/* The gRPC service a component's health is checked under (gateway: none, it is HTTP). */}}
{{- define "spaces.healthService" -}}
{{- printf "spaces.%s.v1.%sService" .component (title .component) }}
{{- end }}

{{/* Which secrets a component reads, as "valuesKey=ENV_NAME" words. */}}
{{- define "spaces.componentSecrets" -}}
{{- $common := "redisUrl=SPACES_REDIS_URL internalSecret=SPACES_INTERNAL_SECRET" }}
{{- $database := "databaseUrl=SPACES_DATABASE_URL" }}
{{- if eq .component "identity" }}
{{- printf "%s %s identityKeyEncryptionSecret=IDENTITY_KEY_ENCRYPTION_SECRET" $common $database }}
{{- else if eq .component "rooms" }}
{{- printf "%s %s mediaGrantSecret=SPACES_MEDIA_GRANT_SECRET liveResumeTokenSecret=ROOMS_LIVE_RESUME_TOKEN_SECRET" $common $database }}
{{- else if eq .component "media" }}
{{- printf "%s mediaGrantSecret=SPACES_MEDIA_GRANT_SECRET" $common }}
{{- else if eq .component "notify" }}
{{- printf "%s %s notifyFcmAccessToken=NOTIFY_FCM_ACCESS_TOKEN notifyWebpushVapidPrivateKey=NOTIFY_WEBPUSH_VAPID_PRIVATE_KEY" $common $database }}
{{- else if eq .component "payments" }}
{{- printf "%s %s" $common $database }}
{{- else }}
{{- $common }}
{{- end }}
{{- end }}

{{/* env entries reading secrets: (dict "root" $ "words" "databaseUrl=SPACES_DATABASE_URL ..."). */}}
{{- define "spaces.secretEnv" -}}
{{- $root := .root }}
{{- range $word := splitList " " .words }}
{{- $pair := splitList "=" $word }}
{{- $ref := index $root.Values.secrets (first $pair) }}
{{- if $ref.key }}
- name: {{ last $pair }}
  valueFrom:
    secretKeyRef:
      name: {{ $ref.secretName | default $root.Values.secrets.existingSecret | quote }}
      key: {{ $ref.key | quote }}
{{- end }}
{{- end }}
{{- end }}

