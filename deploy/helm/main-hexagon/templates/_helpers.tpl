{{/* The base name of every object: the release name if it holds the chart name. */}}
{{- define "main-hexagon.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "main-hexagon.configName" -}}
{{- printf "%s-config" (include "main-hexagon.fullname" .) -}}
{{- end -}}

{{- define "main-hexagon.secretName" -}}
{{- required "secrets.existingSecret must name the Secret the pods read" .Values.secrets.existingSecret -}}
{{- end -}}

{{- define "main-hexagon.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Labels on every object. */}}
{{- define "main-hexagon.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/part-of: enginedge
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* The service's selector labels. */}}
{{- define "main-hexagon.selectorLabels" -}}
app: {{ include "main-hexagon.fullname" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* A worker's selector labels; call with (dict "root" $ "type" $type). */}}
{{- define "main-hexagon.workerSelectorLabels" -}}
app: worker
worker-type: {{ .type }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- end -}}

{{/* env entries (a YAML list) reading `keys` from the Secret;
call with (dict "root" $ "keys" $keys "optional" bool). */}}
{{- define "main-hexagon.secretEnv" -}}
{{- $out := list }}
{{- range .keys }}
{{- $ref := dict "name" (include "main-hexagon.secretName" $.root) "key" . }}
{{- if $.optional }}
{{- $_ := set $ref "optional" true }}
{{- end }}
{{- $out = append $out (dict "name" . "valueFrom" (dict "secretKeyRef" $ref)) }}
{{- end }}
{{- toYaml $out }}
{{- end -}}

{{/* env entries (a YAML list) reading `keys` from the ConfigMap, each of which must be in
`config`; call with (dict "root" $ "keys" $keys). */}}
{{- define "main-hexagon.configEnv" -}}
{{- $out := list }}
{{- range .keys }}
{{- if not (hasKey $.root.Values.config .) }}
{{- fail (printf "config.%s is needed (a worker reads it)" .) }}
{{- end }}
{{- $ref := dict "name" (include "main-hexagon.configName" $.root) "key" . }}
{{- $out = append $out (dict "name" . "valueFrom" (dict "configMapKeyRef" $ref)) }}
{{- end }}
{{- toYaml $out }}
{{- end -}}

{{/* The service container's env: the Secret's keys, then extraEnv. */}}
{{- define "main-hexagon.serviceEnv" -}}
{{- $required := include "main-hexagon.secretEnv" (dict "root" . "keys" .Values.secrets.requiredKeys "optional" false) | fromYamlArray }}
{{- $optional := include "main-hexagon.secretEnv" (dict "root" . "keys" .Values.secrets.optionalKeys "optional" true) | fromYamlArray }}
{{- toYaml (concat $required $optional (.Values.extraEnv | default list)) }}
{{- end -}}

{{/* A worker container's env; call with (dict "root" $ "worker" $worker). */}}
{{- define "main-hexagon.workerEnv" -}}
{{- $common := include "main-hexagon.configEnv" (dict "root" .root "keys" .root.Values.workerConfigKeys) | fromYamlArray }}
{{- $host := list (dict "name" "WORKER_ADVERTISED_HOST" "valueFrom" (dict "fieldRef" (dict "fieldPath" "status.podIP"))) }}
{{- $secrets := include "main-hexagon.secretEnv" (dict "root" .root "keys" (.worker.optionalSecretKeys | default list) "optional" true) | fromYamlArray }}
{{- $extra := include "main-hexagon.configEnv" (dict "root" .root "keys" (.worker.extraConfigKeys | default list)) | fromYamlArray }}
{{- toYaml (concat $common $host $secrets $extra) }}
{{- end -}}

{{/* Preferred anti-affinity over nodes for pods with these labels (a YAML string). */}}
{{- define "main-hexagon.antiAffinity" -}}
podAntiAffinity:
  preferredDuringSchedulingIgnoredDuringExecution:
    - weight: 100
      podAffinityTerm:
        labelSelector:
          matchLabels:
            {{- . | nindent 12 }}
        topologyKey: kubernetes.io/hostname
{{- end -}}
